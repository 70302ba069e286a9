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
  """Turns per-domain losses into domain sampling weights.

  Driven by the training loop: once `set_teacher_losses(lT)` (teacher modes),
  then `update(step, lS)` at step 0 before training and every K steps after;
  the returned weights are what the mixture samples with until the next
  update. With the training-batch signal the loop passes both losses of the
  interval instead: `update(step, lS, teacher_losses=lT)`.

  Args:
    domains: domain names, in the order used by every per-domain array.
    mode: one of MODES.
    alpha: smoothing coefficient in [0, 1] (mode 'ddk' only); 1 = no uniform
      component, 0 = uniform forever.
    floor: minimum weight per domain, a scalar (same for all) or one value
      per domain (sequence or {domain: value}); sum of floors must be <= 1.
      Applied after every weight computation, see `ddk.apply_bounds`.
    cap: maximum weight per domain, given like `floor` (1: none); the caps must
      sum to >= 1 and each be >= its floor.
    discrepancy: 'ratio' (x = lS / lT, the paper) or 'excess' (x = lS - lT).
    softmax_temperature: tau > 0 of softmax(x / tau) and exp(x / tau) (1: the paper).
    signal: where the loop takes lS and lT from, 'validation' (the paper) or
      'train' (the training batches of the interval); recorded in the state so a
      resume cannot mix the two.
    signal_ema: the weight in (0, 1] of the newest interval in the running
      training-batch losses (1: the interval's mean alone); recorded likewise.
    initial_weights: weights in effect before the first update. For 'cpt' and
      'kd' this is the static mixture (default uniform). For 'ddk' and
      'ddk_no_smoothing' it only matters if the loop samples before its first
      update (the step-0 update disabled); it is not the smoothing prior of
      the first update, which is uniform. Not allowed for 'ddk_equal_sampling'
      (uniform by definition). Normalised to sum 1.
  """

  def __init__(self, domains: Sequence[str], mode: str, alpha: float = 0.5,
               floor: float | Sequence[float] | Mapping[str, float] = 0.0,
               initial_weights: Sequence[float] | Mapping[str, float] | None = None, *,
               cap: float | Sequence[float] | Mapping[str, float] = 1.0, discrepancy: str = "ratio",
               softmax_temperature: float = 1.0, signal: str = "validation", signal_ema: float = 1.0):
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
    if discrepancy not in ddk.DISCREPANCIES:
      raise ValueError(f"Unknown discrepancy {discrepancy!r}; choose one of {list(ddk.DISCREPANCIES)}.")
    softmax_temperature = float(softmax_temperature)
    if not (np.isfinite(softmax_temperature) and softmax_temperature > 0):
      raise ValueError(f"softmax_temperature must be > 0 (the paper uses 1); got {softmax_temperature}.")
    if signal not in ddk.SIGNALS:
      raise ValueError(f"Unknown signal {signal!r}; choose one of {list(ddk.SIGNALS)}.")
    signal_ema = float(signal_ema)
    if not (0.0 < signal_ema <= 1.0):
      raise ValueError(f"signal_ema must be in (0, 1] (1: the last interval's mean alone); got {signal_ema}.")
    self._domains = domains
    self._mode = mode
    self._alpha = alpha
    self._discrepancy = discrepancy
    self._temperature = softmax_temperature
    self._signal = signal
    self._signal_ema = signal_ema
    n = len(domains)
    self._floor = self._parse_floor(floor)
    self._cap = self._parse_bound(cap, "cap")
    problem = ddk.check_bounds(self._floor, self._cap, self._domains)
    if problem:
      raise ValueError(f"floor and cap: {problem}")
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
    self._weights = ddk.apply_bounds(w, self._floor, self._cap)
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

  def _parse_bound(self, value, what: str) -> np.ndarray:
    n = len(self._domains)
    if np.isscalar(value):
      f = np.full(n, float(value))
    else:
      f = self._per_domain_array(value, what)
    for d, v in zip(self._domains, f):
      if not np.isfinite(v) or v < 0 or v > 1:
        raise ValueError(f"{what} for domain {d!r} is {v!r}; {what}s must be in "
                         f"[0, 1].")
    return f

  def _parse_floor(self, floor) -> np.ndarray:
    n = len(self._domains)
    f = self._parse_bound(floor, "floor")
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
  def cap(self) -> np.ndarray:
    return self._cap.copy()

  @property
  def discrepancy(self) -> str:
    return self._discrepancy

  @property
  def softmax_temperature(self) -> float:
    return self._temperature

  @property
  def signal(self) -> str:
    return self._signal

  @property
  def signal_ema(self) -> float:
    return self._signal_ema

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
    ratio, weights}; the last four per-domain maps, teacher_loss and ratio
    None when there are no teacher losses. ratio is always lS / lT; with
    discrepancy 'excess' a `discrepancy` map holds the x that was used."""
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

  def update(self, step: int, student_losses, teacher_losses=None) -> np.ndarray:
    """Records the student's per-domain CE at `step` and returns the weights
    to sample with from now until the next update.

    `student_losses` is a sequence in domain order or a {domain: loss} map.
    `teacher_losses` (same form) are the teacher's losses measured on the same
    rows, for this update only (the training-batch signal); None: the cached
    validation losses of `set_teacher_losses`. Steps must strictly increase
    across calls (a repeated step would apply the smoothing twice).
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
    teacher = self._teacher
    if teacher_losses is not None:
      if self._mode == "cpt":
        raise ValueError("Mode 'cpt' has no teacher; update() takes no teacher losses in it.")
      teacher = self._validate_losses(teacher_losses, "teacher losses", positive=True)
    if self._mode in ddk.TEACHER_RATIO_MODES and teacher is None:
      raise ValueError(
          f"Mode {self._mode!r} needs the teacher's per-domain validation "
          f"losses: call set_teacher_losses(lT) before the first update().")

    ratio = None if teacher is None else lS / teacher
    x = ratio if self._discrepancy == "ratio" or teacher is None else ddk.discrepancy(lS, teacher, self._discrepancy)
    r = ddk.next_weights(self._mode, self._weights, x, alpha=self._alpha, floor=self._floor,
                         first_update=not self._history, temperature=self._temperature, cap=self._cap)
    self._weights = r.copy()

    def as_map(a):
      return {d: float(v) for d, v in zip(self._domains, a)}

    entry = {
        "step": step,
        "student_loss": as_map(lS),
        "teacher_loss": None if teacher is None else as_map(teacher),
        "ratio": None if ratio is None else as_map(ratio),
        "weights": as_map(r),
    }
    if self._discrepancy != "ratio":
      entry["discrepancy"] = None if teacher is None else as_map(x)
    self._history.append(entry)
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
        "cap": [float(v) for v in self._cap],
        "discrepancy": self._discrepancy,
        "softmax_temperature": float(self._temperature),
        "signal": self._signal,
        "signal_ema": float(self._signal_ema),
        "weights": [float(v) for v in self._weights],
        "teacher_losses": (None if self._teacher is None else
                           [float(v) for v in self._teacher]),
        "history": copy.deepcopy(self._history),
    }

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores a `state_dict()` (e.g. after a JSON round trip) exactly.

    Refuses a state from a different experiment: domains, mode, alpha,
    floor, cap, discrepancy, softmax_temperature, signal and signal_ema must
    match this controller's configuration. A state written before cap,
    discrepancy, softmax_temperature, signal and signal_ema existed has their
    defaults (no cap, 'ratio', 1, 'validation', 1).
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
    n = len(self._domains)
    saved = {"cap": [float(v) for v in state.get("cap", [1.0] * n)],
             "discrepancy": state.get("discrepancy", "ratio"),
             "softmax_temperature": float(state.get("softmax_temperature", 1.0)),
             "signal": state.get("signal", "validation"),
             "signal_ema": float(state.get("signal_ema", 1.0))}
    mine = {"cap": [float(v) for v in self._cap], "discrepancy": self._discrepancy,
            "softmax_temperature": self._temperature, "signal": self._signal, "signal_ema": self._signal_ema}
    for key, value in saved.items():
      if value != mine[key]:
        raise ValueError(
            f"Checkpointed controller has {key}={value!r} but this run has "
            f"{key}={mine[key]!r} (ddk.{key}); resume with the same setting or start a fresh run.")
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
