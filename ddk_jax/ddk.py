"""The DDK formulas: per-domain losses of student and teacher in, sampling weights out.

Pure float64 numpy, deterministic (every host computes bit-identical weights from the same
losses). docs/ddk.md derives each formula; with x[i] = lS[i] / lT[i] and N domains:

* domain discrepancy factor   r[i]   = exp(x[i]) / sum_j exp(x[j])
* factor smooth updating      psi[i] = r_prev[i] * exp(x[i])
                              r[i]   = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N
* floor                       r'[i]  = max(floor[i], c * r[i]), c chosen so sum r' = 1

Modes (`MODES`):

* ``cpt``                 static mixture, no teacher.
* ``kd``                  static mixture with a teacher (CE + KD loss).
* ``ddk``                 smoothed DDK updates; the first update's r_prev is uniform.
* ``ddk_no_smoothing``    r = softmax(x), recomputed raw at every update.
* ``ddk_equal_sampling``  uniform weights forever (the paper's equal-sampling ablation).
"""

from __future__ import annotations

import numpy as np

MODES = ("cpt", "kd", "ddk", "ddk_no_smoothing", "ddk_equal_sampling")
DYNAMIC_MODES = ("ddk", "ddk_no_smoothing")  # weights move with the losses
TEACHER_RATIO_MODES = ("ddk", "ddk_no_smoothing", "ddk_equal_sampling")  # need lT at every update


def uses_teacher(mode: str) -> bool:
  """Every mode but `cpt` trains against a teacher (and caches its validation loss)."""
  return mode != "cpt"


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


def next_weights(mode: str, current: np.ndarray, ratio: np.ndarray | None, *, alpha: float, floor: np.ndarray,
                 first_update: bool) -> np.ndarray:
  """The weights after an update in `mode`, from the current weights and x = lS / lT.

  Static modes (`cpt`, `kd`, `ddk_equal_sampling`) keep `current`. In `ddk` the first
  update smooths against the uniform r_prev (the paper's initial r), later ones against
  `current`.
  """
  if mode == "ddk":
    n = current.shape[0]
    r_prev = np.full(n, 1.0 / n) if first_update else current
    return apply_floor(smoothed_update(r_prev, ratio, alpha), floor)
  if mode == "ddk_no_smoothing":
    return apply_floor(stable_softmax(ratio), floor)
  return np.asarray(current, dtype=np.float64).copy()
