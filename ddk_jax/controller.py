"""The DDK mixture controller: the state around the formulas of `ddk_jax.ddk`.

It holds the current weights, the teacher's cached per-domain validation losses and the
history of updates, checks its inputs, and saves/restores itself as plain JSON (inside
every checkpoint). Host-side numpy only; the training loop feeds it losses that are
already reduced over all hosts, so every host computes identical weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ddk_jax import ddk
from ddk_jax.ddk import MODES  # noqa: F401  (kept importable from here)

STATE_VERSION = 1

# Float slack for "sums to 1" / "floor * N <= 1" checks on user input.
_SUM_TOL = 1e-9


class MixtureController:
  """Turns per-domain validation losses into domain sampling weights.

  Driven by the training loop: once `set_teacher_losses(lT)` (teacher modes),
  then `update(step, lS)` at step 0 before training and every K steps after;
  the returned weights are what the mixture samples with until the next
  update.

  Args:
    domains: domain names, in the order used by every per-domain array.
    mode: one of MODES.
    alpha: smoothing coefficient in [0, 1] (mode 'ddk' only); 1 = no uniform
      component, 0 = uniform forever.
    floor: minimum weight per domain, a scalar (same for all) or one value
      per domain (sequence or {domain: value}); sum of floors must be <= 1.
      Applied after every weight computation, see `apply_floor`.
    initial_weights: weights in effect before the first update. For 'cpt' and
      'kd' this is the static mixture (default uniform). For 'ddk' and
      'ddk_no_smoothing' it only matters if the loop samples before its first
      update (the step-0 update disabled); it is not the smoothing prior of
      the first update, which is uniform. Not allowed for 'ddk_equal_sampling'
      (uniform by definition). Normalised to sum 1.
  """

  def __init__(self, domains: Sequence[str], mode: str, alpha: float = 0.5,
               floor: float | Sequence[float] | Mapping[str, float] = 0.0,
               initial_weights: Sequence[float] | Mapping[str, float] | None = None):
    domains = [d for d in domains]
    if not domains:
      raise ValueError("MixtureController needs at least one domain.")
    for d in domains:
      if not isinstance(d, str) or not d:
        raise ValueError(f"Domain names must be non-empty strings; got {d!r}.")
    if len(set(domains)) != len(domains):
      dup = sorted({d for d in domains if domains.count(d) > 1})
      raise ValueError(f"Duplicate domain names {dup}; names must be unique.")
    if mode not in ddk.MODES:
      raise ValueError(f"Unknown mode {mode!r}; choose one of {list(ddk.MODES)}.")
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
      raise ValueError(f"alpha must be in [0, 1] (the paper uses 0.5); got {alpha}.")
    self._domains = domains
    self._mode = mode
    self._alpha = alpha
    n = len(domains)
    self._floor = self._parse_floor(floor)
    if mode == "ddk_equal_sampling" and initial_weights is not None:
      raise ValueError(
          "Mode 'ddk_equal_sampling' samples uniformly by definition; remove "
          "initial_weights (or use mode 'kd' for a fixed non-uniform mixture).")
    if initial_weights is None:
      w = np.full(n, 1.0 / n)
    else:
      w = self._per_domain_array(initial_weights, "initial_weights")
      bad = [d for d, v in zip(domains, w) if not np.isfinite(v) or v < 0]
      if bad:
        raise ValueError(
            f"initial_weights must be finite and >= 0; domain {bad[0]!r} has "
            f"{w[domains.index(bad[0])]!r}.")
      if np.sum(w) <= 0:
        raise ValueError("initial_weights sum to 0; give at least one domain a "
                         "positive weight.")
      w = w / np.sum(w)
    self._weights = ddk.apply_floor(w, self._floor)
    self._teacher: np.ndarray | None = None
    self._history: list[dict[str, Any]] = []

  # -- configuration -------------------------------------------------------

  def _per_domain_array(self, values, what: str) -> np.ndarray:
    """Mapping {domain: v} or sequence in domain order -> float64 array."""
    n = len(self._domains)
    if isinstance(values, Mapping):
      missing = [d for d in self._domains if d not in values]
      extra = [k for k in values if k not in self._domains]
      if missing or extra:
        raise ValueError(
            f"{what}: keys must be exactly the domains {self._domains}; "
            f"missing {missing}, unknown {extra}.")
      values = [values[d] for d in self._domains]
    try:
      arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{what}: expected {n} numbers, one per domain "
                       f"{self._domains}; got {values!r} ({e}).") from None
    if arr.shape != (n,):
      raise ValueError(
          f"{what}: expected {n} values, one per domain {self._domains}; got "
          f"shape {arr.shape}.")
    return arr

  def _parse_floor(self, floor) -> np.ndarray:
    n = len(self._domains)
    if np.isscalar(floor):
      f = np.full(n, float(floor))
    else:
      f = self._per_domain_array(floor, "floor")
    for d, v in zip(self._domains, f):
      if not np.isfinite(v) or v < 0 or v > 1:
        raise ValueError(f"floor for domain {d!r} is {v!r}; floors must be in "
                         f"[0, 1].")
    if np.sum(f) > 1.0 + _SUM_TOL:
      raise ValueError(
          f"The per-domain floors sum to {np.sum(f):.6g} > 1 (floor * N <= 1 "
          f"is required; with {n} domains a scalar floor must be <= "
          f"{1.0 / n:.6g}). Lower the floor.")
    return f

  @property
  def domains(self) -> list[str]:
    return list(self._domains)

  @property
  def mode(self) -> str:
    return self._mode

  @property
  def alpha(self) -> float:
    return self._alpha

  @property
  def floor(self) -> np.ndarray:
    return self._floor.copy()

  @property
  def weights(self) -> np.ndarray:
    """Current sampling weights (float64, sums to 1), in domain order."""
    return self._weights.copy()

  @property
  def teacher_losses(self) -> np.ndarray | None:
    return None if self._teacher is None else self._teacher.copy()

  @property
  def history(self) -> list[dict[str, Any]]:
    """One JSON-ready dict per update: {step, student_loss, teacher_loss,
    ratio, weights}; the last three per-domain maps, teacher_loss and ratio
    None when there are no teacher losses."""
    return copy.deepcopy(self._history)

  # -- inputs ----------------------------------------------------------------

  def _validate_losses(self, losses, who: str, positive: bool) -> np.ndarray:
    arr = self._per_domain_array(losses, who)
    for d, v in zip(self._domains, arr):
      if not np.isfinite(v):
        raise ValueError(
            f"{who}: domain {d!r} has a non-finite loss {v!r}; check that "
            f"domain's validation data and the eval step (NaN/inf loss).")
      if positive and v <= 0:
        raise ValueError(
            f"{who}: domain {d!r} has loss {v!r}, but the teacher's loss is the "
            f"denominator of lS/lT and must be > 0 (a mean token "
            f"cross-entropy). Check that domain's validation data.")
      if not positive and v < 0:
        raise ValueError(
            f"{who}: domain {d!r} has negative loss {v!r}; a mean token "
            f"cross-entropy is >= 0. Check the eval step.")
    return arr

  def set_teacher_losses(self, lT, force: bool = False) -> None:
    """Caches the teacher's per-domain validation CE (teacher is frozen, so
    this is computed once). Setting different values again raises unless
    `force=True`; setting identical values is a no-op."""
    if self._mode == "cpt":
      raise ValueError(
          "Mode 'cpt' has no teacher, so there are no teacher losses to set. "
          "Use mode 'kd' or a ddk mode to train with a teacher.")
    arr = self._validate_losses(lT, "teacher losses", positive=True)
    if self._teacher is not None and not force and not np.array_equal(
        arr, self._teacher):
      raise ValueError(
          f"Teacher losses are already set to {self._teacher.tolist()} and the "
          f"new values {arr.tolist()} differ. The teacher is frozen, so they "
          f"should not change; pass force=True to overwrite deliberately.")
    self._teacher = arr

  # -- the update ------------------------------------------------------------

  def update(self, step: int, student_losses) -> np.ndarray:
    """Records the student's per-domain validation CE at `step` and returns
    the weights to sample with from now until the next update.

    `student_losses` is a sequence in domain order or a {domain: loss} map.
    Steps must strictly increase across calls (a repeated step would apply
    the smoothing twice).
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
      raise ValueError(f"step must be an int; got {step!r}.")
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0; got {step}.")
    if self._history and step <= self._history[-1]["step"]:
      raise ValueError(
          f"update() at step {step}, but the last update was at step "
          f"{self._history[-1]['step']}; steps must increase. After restoring "
          f"a checkpoint taken after an update, do not repeat that update.")
    lS = self._validate_losses(student_losses, "student losses", positive=False)
    if self._mode in ddk.TEACHER_RATIO_MODES and self._teacher is None:
      raise ValueError(
          f"Mode {self._mode!r} needs the teacher's per-domain validation "
          f"losses: call set_teacher_losses(lT) before the first update().")

    ratio = None if self._teacher is None else lS / self._teacher
    r = ddk.next_weights(self._mode, self._weights, ratio, alpha=self._alpha, floor=self._floor,
                         first_update=not self._history)
    self._weights = r.copy()

    def as_map(a):
      return {d: float(v) for d, v in zip(self._domains, a)}

    self._history.append({
        "step": step,
        "student_loss": as_map(lS),
        "teacher_loss": None if self._teacher is None else as_map(self._teacher),
        "ratio": None if ratio is None else as_map(ratio),
        "weights": as_map(r),
    })
    return self.weights

  # -- checkpointing -----------------------------------------------------------

  def state_dict(self) -> dict[str, Any]:
    """Plain-JSON state (python str/float/int/list/dict/None only)."""
    return {
        "version": STATE_VERSION,
        "mode": self._mode,
        "domains": list(self._domains),
        "alpha": float(self._alpha),
        "floor": [float(v) for v in self._floor],
        "weights": [float(v) for v in self._weights],
        "teacher_losses": (None if self._teacher is None else
                           [float(v) for v in self._teacher]),
        "history": copy.deepcopy(self._history),
    }

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores a `state_dict()` (e.g. after a JSON round trip) exactly.

    Refuses a state from a different experiment: domains, mode, alpha and
    floor must match this controller's configuration.
    """
    required = ("version", "mode", "domains", "alpha", "floor", "weights",
                "teacher_losses", "history")
    missing = [k for k in required if k not in state]
    if missing:
      raise ValueError(f"Controller state is missing keys {missing}; is this a "
                       f"MixtureController.state_dict()?")
    if state["version"] != STATE_VERSION:
      raise ValueError(f"Controller state version {state['version']!r} is not "
                       f"supported (expected {STATE_VERSION}).")
    if list(state["domains"]) != self._domains:
      raise ValueError(
          f"Checkpointed controller has domains {list(state['domains'])} but "
          f"this run has {self._domains}; resume with the same domain list (and "
          f"order) or start a fresh run.")
    if state["mode"] != self._mode:
      raise ValueError(
          f"Checkpointed controller has mode {state['mode']!r} but this run has "
          f"mode {self._mode!r}; resume with the same mode or start a fresh run.")
    if float(state["alpha"]) != self._alpha:
      raise ValueError(
          f"Checkpointed controller has alpha={state['alpha']!r} but this run "
          f"has alpha={self._alpha!r}; resume with the same alpha.")
    if [float(v) for v in state["floor"]] != [float(v) for v in self._floor]:
      raise ValueError(
          f"Checkpointed controller has floor {list(state['floor'])} but this "
          f"run has {self._floor.tolist()}; resume with the same floor.")
    weights = np.asarray(state["weights"], dtype=np.float64)
    if weights.shape != (len(self._domains),) or not np.all(np.isfinite(weights)):
      raise ValueError(f"Checkpointed weights {state['weights']!r} are not "
                       f"{len(self._domains)} finite numbers.")
    teacher = state["teacher_losses"]
    teacher = None if teacher is None else np.asarray(teacher, dtype=np.float64)
    if teacher is not None and teacher.shape != (len(self._domains),):
      raise ValueError(f"Checkpointed teacher_losses {state['teacher_losses']!r} "
                       f"do not have one value per domain.")
    self._weights = weights
    self._teacher = teacher
    self._history = copy.deepcopy(list(state["history"]))
