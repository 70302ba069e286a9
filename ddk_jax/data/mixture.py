"""A domain mixture whose weights can change between steps, with exact resume.

`DynamicMixtureIterDataset(parents, weights, seed=..., process_index=...)` is a
grain `IterDataset` over one `IterDataset` per domain (each yielding packed
rows of one domain). For the n-th row it yields (n counts from 0 over the
iterator's whole life, across `set_weights` calls and restores) it draws

    u = uniform(seed, process_index, n)          counter-based: no RNG state
    domain = first i with u * sum(w) < w[0] + ... + w[i]

and returns the next row of that domain. Because the draw is a pure function
of (seed, process_index, n) and the current weights, the iterator state is
just `{"counter": n, "weights": w, "parents": [state of each domain]}`, plain
JSON, and a restored iterator yields exactly the rows the original would have,
whatever weights are set afterwards.

Weights: one finite, non-negative number per domain with a positive sum
(ValueError otherwise). They need not be normalised. A domain with weight 0 is
never drawn while its weight is 0 (its iterator just does not advance); DDK's
smoothed factors are always positive anyway.

Nothing may prefetch between this iterator and the training step: the state
describes the rows handed out so far, so rows buffered downstream would be
lost (or replayed) on restore, and `set_weights` would apply late.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from ddk_jax.data.config import DataConfigError, check_weights

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
  """The SplitMix64 finaliser: a bijective, well-mixing 64-bit hash."""
  x = (x + 0x9E3779B97F4A7C15) & _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


def counter_uniform(seed: int, process_index: int, counter: int) -> float:
  """A uniform float in [0, 1), a pure function of its three integer keys.

  Chained SplitMix64 (~1 us in Python), identical on every platform.
  """
  h = _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ (process_index
                                                        & _M64))
                  ^ (counter & _M64))
  return (h >> 11) * (1.0 / (1 << 53))


def _plain_json(state: Any, what: str) -> Any:
  """A deep copy of `state` made only of JSON types (fails loudly if not)."""
  try:
    return json.loads(json.dumps(state))
  except TypeError as e:
    raise TypeError(
        f"{what} returned a state that is not plain JSON ({e}); numpy scalars "
        "must be converted with int()/float().") from None


class DynamicMixtureDatasetIterator(grain.DatasetIterator):
  """Iterator of DynamicMixtureIterDataset; see the module docstring."""

  def __init__(self, parents: Sequence[grain.DatasetIterator],
               weights: Sequence[float], *, seed: int, process_index: int,
               names: Sequence[str]):
    super().__init__(list(parents))
    self._seed = int(seed)
    self._process_index = int(process_index)
    self._names = list(names)
    self._counter = 0
    self._weights: list[float] = []
    self._cumulative: list[float] = []
    self._last_positive = 0
    self.set_weights(weights)

  # -- weights -------------------------------------------------------------

  @property
  def weights(self) -> list[float]:
    """The current weights as given (not normalised)."""
    return list(self._weights)

  @property
  def counter(self) -> int:
    """Rows drawn so far (also the key of the next draw)."""
    return self._counter

  @property
  def domain_names(self) -> list[str]:
    return list(self._names)

  def set_weights(self, weights: Sequence[float]) -> None:
    """Sets the weights used for all following draws.

    Raises ValueError (DataConfigError) for a wrong length, NaN/inf, negative
    entries or an all-zero list.
    """
    w = check_weights(weights, self._names, where="mixture weights")
    self._weights = w
    self._cumulative = list(itertools.accumulate(w))
    self._last_positive = max(i for i, x in enumerate(w) if x > 0)

  def draw_domain(self, counter: int) -> int:
    """The domain the row with this counter comes from, at current weights."""
    u = counter_uniform(self._seed, self._process_index, counter)
    i = bisect.bisect_right(self._cumulative, u * self._cumulative[-1])
    # u < 1, but u * total can round up to total; never pick a 0-weight tail.
    return min(i, self._last_positive)

  # -- iteration -----------------------------------------------------------

  def __next__(self) -> Any:
    d = self.draw_domain(self._counter)
    row = next(self._parents[d])  # StopIteration only for finite domains.
    self._counter += 1
    return row

  def next_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """Draws `batch_size` rows and stacks them (see `stack_rows`)."""
    return stack_rows([next(self) for _ in range(batch_size)])

  # -- state ---------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    return {
        "counter": self._counter,
        "weights": list(self._weights),
        "seed": self._seed,
        "process_index": self._process_index,
        "domains": list(self._names),
        "parents": [_plain_json(p.get_state(), f"domain {n!r} iterator")
                    for n, p in zip(self._names, self._parents)],
    }

  def set_state(self, state: dict[str, Any]) -> None:
    names = state.get("domains", self._names)
    if list(names) != self._names:
      raise DataConfigError(
          f"mixture state is for domains {list(names)} but this pipeline has "
          f"{self._names}; restore with the same data.domains (same order).")
    if len(state["parents"]) != len(self._parents):
      raise DataConfigError(
          f"mixture state has {len(state['parents'])} domain states for "
          f"{len(self._parents)} domains.")
    if state.get("process_index", self._process_index) != self._process_index:
      raise DataConfigError(
          f"mixture state was saved by process {state['process_index']} but "
          f"is restored in process {self._process_index}; each process must "
          "restore its own iterator state (same process count).")
    if state.get("seed", self._seed) != self._seed:
      raise DataConfigError(
          f"mixture state was saved with data.seed={state['seed']} but this "
          f"pipeline has seed {self._seed}.")
    for parent, parent_state in zip(self._parents, state["parents"]):
      parent.set_state(parent_state)
    self._counter = int(state["counter"])
    self.set_weights(state["weights"])

  def __str__(self) -> str:
    return (f"DynamicMixtureDatasetIterator(domains={self._names}, "
            f"counter={self._counter})")


class DynamicMixtureIterDataset(grain.IterDataset):
  """Mixes per-domain IterDatasets with weights settable between steps."""

  def __init__(self, parents: Sequence[grain.IterDataset],
               weights: Sequence[float], *, seed: int = 0,
               process_index: int = 0, names: Sequence[str] | None = None):
    super().__init__(list(parents))
    self._names = (list(names) if names is not None
                   else [f"domain{i}" for i in range(len(parents))])
    if len(self._names) != len(parents):
      raise ValueError(f"{len(self._names)} names for {len(parents)} parents.")
    if not parents:
      raise ValueError("DynamicMixtureIterDataset needs at least one parent.")
    self._weights = check_weights(weights, self._names,
                                  where="mixture weights")
    if not (isinstance(seed, int) and 0 <= seed < 2**64):
      raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    self._seed = seed
    self._process_index = int(process_index)

  @property
  def domain_names(self) -> list[str]:
    return list(self._names)

  def __iter__(self) -> DynamicMixtureDatasetIterator:
    return DynamicMixtureDatasetIterator(
        [p.__iter__() for p in self._parents], self._weights,
        seed=self._seed, process_index=self._process_index, names=self._names)

  def __str__(self) -> str:
    return f"DynamicMixtureIterDataset(domains={self._names})"


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks rows (dicts of arrays) into a batch: [B, S] arrays, [B] domain_id."""
  if not rows:
    raise ValueError("stack_rows needs at least one row.")
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


__all__ = [
    "DynamicMixtureIterDataset", "DynamicMixtureDatasetIterator",
    "counter_uniform", "stack_rows",
]
