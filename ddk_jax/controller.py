"""DDK mixture controller: per-domain validation losses in, sampling weights out.

Pure host-side numpy and deterministic: given the same inputs every process
computes bit-identical weights. JAX is imported only inside
`global_domain_sums`, which reduces per-domain (sum, count) pairs over
processes so every host feeds identical losses to its controller.

The formulas (docs/ddk.md has the long version, /work/shared/DESIGN.md §1 is the
contract), with x[i] = lS[i] / lT[i]:

* domain discrepancy factor   r[i]   = exp(x[i]) / sum_j exp(x[j])
* factor smooth updating      psi[i] = r_prev[i] * exp(x[i])
                              r[i]   = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N

Modes:

* ``cpt``                 static mixture, no teacher; updates only record history.
* ``kd``                  static mixture with a teacher; updates only record history.
* ``ddk``                 smoothed DDK updates. On the first update r_prev is
                          uniform, so it equals alpha * softmax(x) + (1 - alpha) / N.
* ``ddk_no_smoothing``    r = softmax(x), recomputed raw every interval.
* ``ddk_equal_sampling``  uniform weights forever; history still records lS, lT.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MODES = ("cpt", "kd", "ddk", "ddk_no_smoothing", "ddk_equal_sampling")
# Modes whose weights move with the validation losses.
DYNAMIC_MODES = ("ddk", "ddk_no_smoothing")
# Modes that need the teacher's losses on every update (ratios are recorded).
_TEACHER_REQUIRED_MODES = ("ddk", "ddk_no_smoothing", "ddk_equal_sampling")
STATE_VERSION = 1

# Float slack for "sums to 1" / "floor * N <= 1" checks on user input.
_SUM_TOL = 1e-9


# ----------------------------------------------------------------------------
# small numeric helpers
# ----------------------------------------------------------------------------


def stable_softmax(x: np.ndarray) -> np.ndarray:
  """softmax in float64, shifted by the max so exp never overflows."""
  x = np.asarray(x, dtype=np.float64)
  e = np.exp(x - np.max(x))
  return e / np.sum(e)


def _smoothed_update(r_prev: np.ndarray, x: np.ndarray,
                     alpha: float) -> np.ndarray:
  """The paper's factor smooth updating.

  psi = r_prev * exp(x) is computed as r_prev * exp(x - max x): the common
  factor exp(max x) cancels in psi / sum(psi) and the shift avoids overflow.
  """
  n = x.shape[0]
  psi = r_prev * np.exp(x - np.max(x))
  return alpha * (psi / np.sum(psi)) + (1.0 - alpha) / n


def apply_floor(r: np.ndarray, floor: np.ndarray) -> np.ndarray:
  """Smallest change to `r` that keeps every weight >= its floor.

  Returns r' with r'[i] = max(floor[i], c * r[i]), where the single scale
  c in (0, 1] is chosen so that sum(r') = 1. Domains below their floor are
  raised to exactly the floor; all others are scaled down by the same factor,
  so their relative proportions are unchanged. If r already satisfies the
  floor, c = 1 and r is returned as is. Requires sum(floor) <= 1.

  c is found exactly by growing the set of clamped domains: with clamped set
  C, c = (1 - sum_{C} floor) / sum_{not C} r. Adding a domain that is below
  its floor can only lower c, so domains once clamped stay clamped and the
  loop ends after at most N rounds.
  """
  r = np.asarray(r, dtype=np.float64)
  floor = np.asarray(floor, dtype=np.float64)
  if not np.any(floor > 0) or np.all(r >= floor):
    return r.copy()
  clamped = np.zeros(r.shape, dtype=bool)
  while True:
    free_mass = float(np.sum(r[~clamped]))
    remaining = 1.0 - float(np.sum(floor[clamped]))
    if free_mass <= 0.0 or remaining <= 0.0:
      # The floors use up (numerically) all the mass: the floors are the answer.
      return floor / np.sum(floor)
    c = remaining / free_mass
    newly = (~clamped) & (c * r < floor)
    if not np.any(newly):
      break
    clamped |= newly
  out = np.where(clamped, floor, c * r)
  # Renormalise away rounding; this moves weights by ~1 ulp at most.
  return out / np.sum(out)


# ----------------------------------------------------------------------------
# per-domain loss reduction (single host and multi-host)
# ----------------------------------------------------------------------------


def _domain_name(domains: Sequence[str] | None, i: int) -> str:
  return repr(domains[i]) if domains is not None else f"#{i}"


def reduce_domain_losses(sums, counts,
                         domains: Sequence[str] | None = None) -> np.ndarray:
  """Per-domain mean loss = sum / count, as float64.

  `sums[i]` is the summed token cross-entropy of domain i over the validation
  set, `counts[i]` its number of target tokens (both already reduced over
  processes, see `global_domain_sums`). Pass `domains` to get their names in
  error messages.
  """
  sums = np.asarray(sums, dtype=np.float64)
  counts = np.asarray(counts, dtype=np.float64)
  if sums.ndim != 1 or counts.shape != sums.shape:
    raise ValueError(
        f"reduce_domain_losses: sums and counts must be 1-D arrays of equal "
        f"length (one entry per domain); got shapes {sums.shape} and "
        f"{counts.shape}.")
  if domains is not None and len(domains) != sums.shape[0]:
    raise ValueError(
        f"reduce_domain_losses: got {sums.shape[0]} (sum, count) pairs for "
        f"{len(domains)} domains {list(domains)}.")
  for i in range(sums.shape[0]):
    name = _domain_name(domains, i)
    if not np.isfinite(counts[i]) or counts[i] <= 0:
      raise ValueError(
          f"Domain {name} has token count {counts[i]!r} in the validation "
          f"reduction: its validation set produced no target tokens. Give the "
          f"domain a non-empty validation split (or more eval batches).")
    if not np.isfinite(sums[i]):
      raise ValueError(
          f"Domain {name} has a non-finite validation loss sum {sums[i]!r}; "
          f"the model diverged or the eval step produced NaN/inf.")
  return sums / counts


def _to_u32_words(a: np.ndarray) -> np.ndarray:
  # float64 -> pairs of uint32 words, so the gather moves exact bits even when
  # JAX has x64 disabled (it would otherwise cast float64 to float32).
  return np.ascontiguousarray(a, dtype=np.float64).view(np.uint32)


def _from_u32_words(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w, dtype=np.uint32).view(np.float64)


def global_domain_sums(sums, counts) -> tuple[np.ndarray, np.ndarray]:
  """Sums per-domain (loss sum, token count) arrays over all JAX processes.

  Returns float64 (sums, counts). With one process they come back unchanged
  (as float64). With several, every process contributes its local arrays;
  they are gathered bit-exactly (float64 sent as uint32 words) and added on
  the host in process-index order, so every host ends up with bit-identical
  totals and therefore computes identical weights. Every process must call
  this, with arrays of the same length (checked; mismatches raise on all).

  Inputs are *process-local* partial sums (host numpy, or fully addressable
  jax arrays). A jax.Array spanning several processes (the output of a
  jitted eval step over a global batch) is already a global total: summing it
  again would count every token process_count() times, so it is refused.
  """
  for name, a in (("sums", sums), ("counts", counts)):
    if getattr(a, "is_fully_addressable", True) is False:
      raise ValueError(
          f"global_domain_sums: `{name}` is a jax.Array spanning several "
          f"processes, i.e. already reduced over all of them; adding it up "
          f"again would double count. Use np.asarray(x.addressable_data(0)) "
          f"directly instead of calling global_domain_sums.")
  sums = np.asarray(sums, dtype=np.float64)
  counts = np.asarray(counts, dtype=np.float64)
  if sums.ndim != 1 or counts.shape != sums.shape:
    raise ValueError(
        f"global_domain_sums: sums and counts must be 1-D arrays of equal "
        f"length; got shapes {sums.shape} and {counts.shape}.")
  import jax  # local import: the controller itself stays numpy-only.

  if jax.process_count() == 1:
    return sums, counts
  from jax.experimental import multihost_utils

  # Agree on the length first: gathering arrays of different shapes would
  # fail (or hang) inside the collective with an unhelpful message.
  lengths = np.asarray(
      multihost_utils.process_allgather(np.array([sums.shape[0]], np.int32)))
  lengths = lengths.reshape(-1)
  if np.any(lengths != lengths[0]):
    raise ValueError(
        f"global_domain_sums: processes passed different numbers of domains "
        f"{lengths.tolist()} (by process index); every process must evaluate "
        f"the same domain list.")
  words = np.concatenate([_to_u32_words(sums), _to_u32_words(counts)])
  gathered = np.asarray(multihost_utils.process_allgather(words))
  gathered = gathered.reshape(jax.process_count(), words.shape[0])
  n = sums.shape[0]
  total_sums = np.zeros(n, np.float64)
  total_counts = np.zeros(n, np.float64)
  for p in range(gathered.shape[0]):  # fixed order => identical rounding
    row = _from_u32_words(gathered[p])
    total_sums = total_sums + row[:n]
    total_counts = total_counts + row[n:]
  return total_sums, total_counts


# ----------------------------------------------------------------------------
# the table printed at each update
# ----------------------------------------------------------------------------


def _ppl(loss: float) -> float:
  return math.exp(loss) if loss < 700 else math.inf


def format_domain_table(domains: Sequence[str], lS, lT, r) -> str:
  """Human-readable per-domain table: losses, their ratio, perplexities, weight.

  `lT` may be None (mode cpt): teacher columns then show '-'.
  """
  lS = np.asarray(lS, dtype=np.float64)
  r = np.asarray(r, dtype=np.float64)
  lT = None if lT is None else np.asarray(lT, dtype=np.float64)
  headers = ["domain", "student CE", "teacher CE", "lS/lT", "student ppl",
             "teacher ppl", "weight"]
  rows = []
  for i, d in enumerate(domains):
    if lT is None:
      t_ce = ratio = t_ppl = "-"
    else:
      t_ce = f"{lT[i]:.4f}"
      ratio = f"{lS[i] / lT[i]:.4f}"
      t_ppl = f"{_ppl(float(lT[i])):.2f}"
    rows.append([str(d), f"{lS[i]:.4f}", t_ce, ratio,
                 f"{_ppl(float(lS[i])):.2f}", t_ppl, f"{r[i]:.4f}"])
  widths = [max(len(h), *(len(row[k]) for row in rows))
            for k, h in enumerate(headers)]

  def line(cells):
    # domain left-aligned, numbers right-aligned
    return "  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                     for k, (c, w) in enumerate(zip(cells, widths)))

  out = [line(headers), "  ".join("-" * w for w in widths)]
  out += [line(row) for row in rows]
  return "\n".join(out)


# ----------------------------------------------------------------------------
# the controller
# ----------------------------------------------------------------------------


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
    if mode not in MODES:
      raise ValueError(f"Unknown mode {mode!r}; choose one of {list(MODES)}.")
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
    self._weights = apply_floor(w, self._floor)
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
  def needs_teacher_eval(self) -> bool:
    """True if the run has a teacher whose validation CE should be computed
    (once) and passed to `set_teacher_losses`: every mode except 'cpt'. The
    ddk modes require it; 'kd' uses it only for the ratio in history."""
    return self._mode != "cpt"

  @property
  def is_dynamic(self) -> bool:
    """True if `update` can change the weights ('ddk', 'ddk_no_smoothing')."""
    return self._mode in DYNAMIC_MODES

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
    if self._mode in _TEACHER_REQUIRED_MODES and self._teacher is None:
      raise ValueError(
          f"Mode {self._mode!r} needs the teacher's per-domain validation "
          f"losses: call set_teacher_losses(lT) before the first update().")

    ratio = None if self._teacher is None else lS / self._teacher
    n = len(self._domains)
    if self._mode == "ddk":
      # First update: r_prev is uniform (the paper's initial r), so this is
      # alpha * softmax(ratio) + (1 - alpha) / N.
      r_prev = self._weights if self._history else np.full(n, 1.0 / n)
      r = apply_floor(_smoothed_update(r_prev, ratio, self._alpha), self._floor)
    elif self._mode == "ddk_no_smoothing":
      r = apply_floor(stable_softmax(ratio), self._floor)
    else:  # static modes and equal sampling: weights never move
      r = self._weights
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

  # -- display -----------------------------------------------------------------

  def format_table(self, lS=None, lT=None, r=None) -> str:
    """Domain table for the given arrays; with no arguments, for the last
    update (lS, cached lT, current weights)."""
    if lS is None:
      if not self._history:
        raise ValueError("format_table(): no update yet; pass lS explicitly.")
      last = self._history[-1]
      lS = [last["student_loss"][d] for d in self._domains]
      if lT is None and last["teacher_loss"] is not None:
        lT = [last["teacher_loss"][d] for d in self._domains]
      if r is None:
        r = [last["weights"][d] for d in self._domains]
    if r is None:
      r = self._weights
    if lT is None and lS is not None and self._teacher is not None:
      lT = self._teacher
    return format_domain_table(self._domains, lS, lT, r)

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
