"""Packing token sequences into fixed-size rows: several sequences per row, told apart by
segment ids, positions restarting at 0 per sequence (the batch contract of training).

Pure numpy, no JAX: the scorer feeds the rows built here to one jitted forward.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Iterator, Sequence

import numpy as np

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one sequence sits in a batch: row `row`, tokens [start, start + length)."""

  index: int  # the sequence's index in the caller's list
  row: int
  start: int
  length: int


def pack_lengths(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
  """Best-fit decreasing: which sequences share each row of `seq_len` tokens.

  Sequences are placed longest first, each in the fullest row that still has room for it
  (a new row when none has).  Returns the indices per row, rows in creation order (so the
  longest sequences come first).  A length outside [1, seq_len] is a ValueError.
  """
  order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # (tokens left, row), sorted
  for i in order:
    n = int(lengths[i])
    if n < 1 or n > seq_len:
      raise ValueError(f"sequence {i} has {n} tokens; rows hold 1 to {seq_len} (seq_len)")
    k = bisect.bisect_left(free, (n, -1))
    if k < len(free):
      left, r = free.pop(k)
    else:
      r, left = len(rows), seq_len
      rows.append([])
    rows[r].append(i)
    if left - n > 0:
      bisect.insort(free, (left - n, r))
  return rows


def empty_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """All-padding rows: token 0, segment id 0 (never read back)."""
  return {k: np.zeros((batch_size, seq_len), np.int32) for k in ROW_KEYS}


def packed_batches(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray] | None, *, seq_len: int,
                   batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], list[Slot]]]:
  """Yields `(batch, slots)`: `batch_size` rows of `seq_len` tokens (the last batch padded with
  empty rows) holding every sequence once, and where each one sits.

  `targets[i]` (same length as `inputs[i]`) fills the `targets` row; None leaves it zero.
  """
  rows = pack_lengths([len(x) for x in inputs], seq_len)
  for first in range(0, len(rows), batch_size):
    batch = empty_batch(batch_size, seq_len)
    slots = []
    for r, members in enumerate(rows[first:first + batch_size]):
      start = 0
      for seg, i in enumerate(members, start=1):
        n = len(inputs[i])
        batch["inputs"][r, start:start + n] = inputs[i]
        if targets is not None:
          batch["targets"][r, start:start + n] = targets[i]
        batch["positions"][r, start:start + n] = np.arange(n, dtype=np.int32)
        batch["segment_ids"][r, start:start + n] = seg
        slots.append(Slot(i, r, start, n))
        start += n
    yield batch, slots
