"""The DDK formulas: per-domain losses of student and teacher in, sampling weights out.

Pure float64 numpy, deterministic (every host computes bit-identical weights from the same
losses). docs/ddk.md derives each formula; with N domains, the discrepancy
x[i] = lS[i] / lT[i] (`discrepancy="ratio"`, the paper) or lS[i] - lT[i] (`"excess"`) and
the softmax temperature tau (1 in the paper):

* domain discrepancy factor   r[i]   = exp(x[i] / tau) / sum_j exp(x[j] / tau)
* factor smooth updating      psi[i] = r_prev[i] * exp(x[i] / tau)
                              r[i]   = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N
* floor and cap               r'[i]  = clip(c * r[i], floor[i], cap[i]), c chosen so sum r' = 1

Modes (`MODES`):

* ``cpt``                 static mixture, no teacher.
* ``kd``                  static mixture with a teacher (CE + KD loss).
* ``ddk``                 smoothed DDK updates; the first update's r_prev is uniform.
* ``ddk_no_smoothing``    r = softmax(x / tau), recomputed raw at every update.
* ``ddk_equal_sampling``  uniform weights forever (the paper's equal-sampling ablation).

Where lS and lT come from (`SIGNALS`): ``validation`` scores the student on held-out rows at
every update (the paper); ``train`` uses the per-domain means of the training batches' own
losses since the last update (`window_signal`), which the train step measures for free.
"""

from __future__ import annotations

import numpy as np

MODES = ("cpt", "kd", "ddk", "ddk_no_smoothing", "ddk_equal_sampling")
DYNAMIC_MODES = ("ddk", "ddk_no_smoothing")  # weights move with the losses
TEACHER_RATIO_MODES = ("ddk", "ddk_no_smoothing", "ddk_equal_sampling")  # need lT at every update
DISCREPANCIES = ("ratio", "excess")
SIGNALS = ("validation", "train")


def uses_teacher(mode: str) -> bool:
  """Every mode but `cpt` trains against a teacher (and caches its validation loss)."""
  return mode != "cpt"


def discrepancy(student: np.ndarray, teacher: np.ndarray, kind: str = "ratio") -> np.ndarray:
  """x = lS / lT (`ratio`, the paper) or lS - lT (`excess`, the teacher as reference model)."""
  student = np.asarray(student, dtype=np.float64)
  teacher = np.asarray(teacher, dtype=np.float64)
  if kind == "ratio":
    return student / teacher
  if kind == "excess":
    return student - teacher
  raise ValueError(f"Unknown discrepancy {kind!r}; choose one of {list(DISCREPANCIES)}.")


def stable_softmax(x: np.ndarray) -> np.ndarray:
  """softmax in float64, shifted by the max so exp never overflows."""
  x = np.asarray(x, dtype=np.float64)
  e = np.exp(x - np.max(x))
  return e / np.sum(e)


def smoothed_update(r_prev: np.ndarray, x: np.ndarray, alpha: float) -> np.ndarray:
  """Factor smooth updating. psi = r_prev * exp(x) is formed as r_prev * exp(x - max x):
  the common factor exp(max x) cancels in psi / sum(psi) and the shift avoids overflow."""
  n = x.shape[0]
  psi = r_prev * np.exp(x - np.max(x))
  return alpha * (psi / np.sum(psi)) + (1.0 - alpha) / n


def apply_floor(r: np.ndarray, floor: np.ndarray) -> np.ndarray:
  """Smallest change to `r` that keeps every weight >= its floor.

  Returns r' with r'[i] = max(floor[i], c * r[i]), where the single scale c in (0, 1] makes
  sum(r') = 1: domains below their floor are raised to it, all others scaled by the same
  factor (their proportions unchanged). Requires sum(floor) <= 1.

  c is found exactly by growing the set of clamped domains: with clamped set C,
  c = (1 - sum_C floor) / sum_{not C} r. Clamping a domain can only lower c, so clamped
  domains stay clamped and the loop ends after at most N rounds.
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
      return floor / np.sum(floor)  # the floors use up all the mass
    c = remaining / free_mass
    newly = (~clamped) & (c * r < floor)
    if not np.any(newly):
      break
    clamped |= newly
  out = np.where(clamped, floor, c * r)
  return out / np.sum(out)  # renormalise away rounding (~1 ulp)


def apply_bounds(r: np.ndarray, floor: np.ndarray, cap: np.ndarray | None = None) -> np.ndarray:
  """Smallest change to `r` that keeps every weight in [floor[i], cap[i]].

  Returns r' with r'[i] = clip(c * r[i], floor[i], cap[i]) and the single scale c > 0 that
  makes sum(r') = 1: domains outside their bounds sit on them, all others are scaled by the
  same factor (their proportions unchanged). `apply_floor` is the case without caps (then
  c <= 1); a cap frees mass, which goes to the other domains in proportion (c >= 1).
  Requires floor <= cap per domain and sum(floor) <= 1 <= sum(cap).

  sum_i clip(c r[i], floor[i], cap[i]) is continuous, non-decreasing and piecewise linear
  in c, with kinks at floor[i] / r[i] and cap[i] / r[i]; c is solved exactly on the piece
  where the sum reaches 1. Domains with r[i] = 0 stay at their floor, unless the other
  domains' caps cannot hold the mass: then they share the rest in proportion to their
  room cap - floor.
  """
  r = np.asarray(r, dtype=np.float64)
  floor = np.asarray(floor, dtype=np.float64)
  if cap is None or np.all(np.asarray(cap, dtype=np.float64) >= 1.0):
    return apply_floor(r, floor)  # no cap binds: the floor-only projection, unchanged
  cap = np.asarray(cap, dtype=np.float64)
  if np.all(r >= floor) and np.all(r <= cap):
    return r.copy()
  pos = r > 0

  def total(c: float) -> float:
    return float(np.sum(np.clip(c * r, floor, cap)))

  kinks = np.unique(np.concatenate([floor[pos] / r[pos], cap[pos] / r[pos]]))
  if not pos.any() or total(float(kinks[-1])) < 1.0:
    # Every domain with weight is at its cap and the floors of the rest do not fill the
    # remainder: the zero-weight domains share it in proportion to their room.
    out = np.where(pos, cap, floor)
    room = np.where(pos, 0.0, cap - floor)
    if np.sum(room) > 0:  # else the caps sum to 1 (up to rounding): they are the weights
      out = out + (1.0 - np.sum(out)) * room / np.sum(room)
    return out / np.sum(out)
  hi = int(np.searchsorted([total(float(k)) for k in kinks], 1.0))  # first kink with total >= 1
  lo_c = 0.0 if hi == 0 else float(kinks[hi - 1])
  mid = 0.5 * (lo_c + float(kinks[hi]))
  scaled = mid * r
  at_floor, at_cap = scaled <= floor, scaled >= cap
  free = ~(at_floor | at_cap)
  if not free.any():  # the sum reaches 1 exactly at a kink
    c = float(kinks[hi])
  else:
    c = (1.0 - float(np.sum(floor[at_floor])) - float(np.sum(cap[at_cap]))) / float(np.sum(r[free]))
  out = np.clip(c * r, floor, cap)
  return out / np.sum(out)  # renormalise away rounding (~1 ulp)


def check_bounds(floor: np.ndarray, cap: np.ndarray, domains: list[str]) -> str | None:
  """What makes per-domain floors and caps infeasible (naming the domains), or None."""
  floor = np.asarray(floor, dtype=np.float64)
  cap = np.asarray(cap, dtype=np.float64)
  crossed = [f"{d} (floor {f:.6g} > cap {c:.6g})" for d, f, c in zip(domains, floor, cap) if f > c]
  if crossed:
    return f"a floor is above its cap for {', '.join(crossed)}; lower the floor or raise the cap."
  if np.sum(floor) > 1.0 + 1e-9:
    named = ", ".join(f"{d}={f:.6g}" for d, f in zip(domains, floor) if f > 0)
    return (f"the floors sum to {np.sum(floor):.6g} > 1 ({named}); they must leave room for a mixture "
            f"(sum(floor) <= 1). Lower them.")
  if np.sum(cap) < 1.0 - 1e-9:
    named = ", ".join(f"{d}={c:.6g}" for d, c in zip(domains, cap))
    return (f"the caps sum to {np.sum(cap):.6g} < 1 ({named}); the weights must fit under them "
            f"(sum(cap) >= 1). Raise them.")
  return None


def next_weights(mode: str, current: np.ndarray, ratio: np.ndarray | None, *, alpha: float, floor: np.ndarray,
                 first_update: bool, temperature: float = 1.0, cap: np.ndarray | None = None) -> np.ndarray:
  """The weights after an update in `mode`, from the current weights and the discrepancy x
  (`ratio`: lS / lT, or lS - lT; see `discrepancy`), at softmax temperature `temperature`.

  Static modes (`cpt`, `kd`, `ddk_equal_sampling`) keep `current`. In `ddk` the first
  update smooths against the uniform r_prev (the paper's initial r), later ones against
  `current`.
  """
  if mode in DYNAMIC_MODES and temperature != 1.0:
    ratio = ratio / temperature
  if mode == "ddk":
    n = current.shape[0]
    r_prev = np.full(n, 1.0 / n) if first_update else current
    return apply_bounds(smoothed_update(r_prev, ratio, alpha), floor, cap)
  if mode == "ddk_no_smoothing":
    return apply_bounds(stable_softmax(ratio), floor, cap)
  return np.asarray(current, dtype=np.float64).copy()


def window_signal(student_sum, teacher_sum, tokens, previous_student, previous_teacher, ema: float = 1.0):
  """Per-domain (lS, lT) for the controller from the training batches of the last interval.

  `student_sum[i]` / `teacher_sum[i]` are the summed token CEs of domain i's training rows
  in the window and `tokens[i]` their target-token count (global sums over hosts). With
  m = sum / tokens, a domain that had rows gets

      l[i] = m[i]                                  (ema = 1: the window's mean; the default)
      l[i] = ema * m[i] + (1 - ema) * previous[i]  (0 < ema < 1; the first value is m[i])

  for each model separately. A domain without rows in the window keeps `previous[i]`. A
  domain that never had a row (previous NaN) counts as an average domain: both of its losses
  are the window's token-weighted means over all domains (its discrepancy is then the
  mixture's). Returns (lS, lT, running lS, running lT, measured): the running values are
  `previous` updated (NaN where still never measured), for the next call; `measured[i]` is
  whether domain i has a value of its own. (None, None, ...) when the window has no tokens
  at all.
  """
  s = np.asarray(student_sum, dtype=np.float64)
  t = np.asarray(teacher_sum, dtype=np.float64)
  n = np.asarray(tokens, dtype=np.float64)
  prev_s = np.asarray(previous_student, dtype=np.float64)
  prev_t = np.asarray(previous_teacher, dtype=np.float64)
  seen = n > 0
  run_s, run_t = prev_s.copy(), prev_t.copy()
  if seen.any():
    m_s, m_t = s[seen] / n[seen], t[seen] / n[seen]
    if ema != 1.0:
      first = np.isnan(prev_s[seen])
      m_s = np.where(first, m_s, ema * m_s + (1.0 - ema) * prev_s[seen])
      m_t = np.where(first, m_t, ema * m_t + (1.0 - ema) * prev_t[seen])
    run_s[seen], run_t[seen] = m_s, m_t
  measured = ~np.isnan(run_s)
  if not seen.any():
    return None, None, run_s, run_t, measured
  total = float(np.sum(n))
  pooled_s, pooled_t = float(np.sum(s)) / total, float(np.sum(t)) / total
  ls = np.where(measured, run_s, pooled_s)
  lt = np.where(measured, run_t, pooled_t)
  return ls, lt, run_s, run_t, measured
