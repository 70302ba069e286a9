"""Per-domain validation: the student's (and, once, the teacher's) mean token CE per domain.

The eval step returns per-domain (CE sum, token count) pairs summed over the global batch
(replicated on every host), so the means computed here are identical on every host.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ddk_jax import sharding


def _domain_name(domains: Sequence[str] | None, i: int) -> str:
  return repr(domains[i]) if domains is not None else f"#{i}"


def reduce_domain_losses(sums, counts,
                         domains: Sequence[str] | None = None) -> np.ndarray:
  """Per-domain mean loss = sum / count, as float64.

  `sums[i]` is the summed token cross-entropy of domain i over the validation
  set, `counts[i]` its number of target tokens (both already reduced over
  processes: the eval step returns global sums). Pass `domains` to get their names in
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


def evaluate_domains(eval_fn: Callable, params: Any, validation: Mapping[str, Any], mesh, rules,
                     names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Per-domain mean validation CE and token counts, over all hosts."""
  sums = np.zeros(len(names))
  counts = np.zeros(len(names))
  for name in names:
    for batch in validation[name]():
      s, c = eval_fn(params, sharding.host_batch_to_global(batch, mesh, rules))
      sums += np.asarray(jax.device_get(s), np.float64)
      counts += np.asarray(jax.device_get(c), np.float64)
  return reduce_domain_losses(sums, counts, names), counts


def rows_key(data_config: Mapping[str, Any], *, num_processes: int, eval_max_rows: int, eval_batch_size: int) -> str:
  """Names the validation rows a run scores: the data config and how the rows are split over
  hosts. Losses measured under different keys are not comparable (lS / lT needs the same
  rows on both sides), so the cached teacher losses are recomputed when it changes."""
  text = json.dumps({"data": data_config, "num_processes": num_processes, "eval_max_rows": eval_max_rows,
                     "eval_batch_size": eval_batch_size}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
