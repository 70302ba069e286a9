"""Per-domain grain pipelines over prepared shards, the train mixture, and
validation batches.

Train, per domain (all on this JAX process):

    ArrayRecord shards of prepared documents            (MapDataset)
    -> [process_index::process_count]                   disjoint per process
    -> shuffle(seed)                                    new order every epoch
    -> repeat()                                         (num_epochs=None)
    -> to (inputs, targets) = (doc[:-1], doc[1:])       per document
    -> to_iter_dataset(ReadOptions(num_threads))        reads ahead in threads
    -> grain ConcatThenSplitIterDataset(seq_len)        pack within the domain
    -> row dict + domain_id
then `DynamicMixtureIterDataset` over the domains (no prefetch after it).

Packing is concat-then-split: documents are laid end to end in fixed
`seq_len` rows; a document that does not fit in the rest of a row is split and
continues (as a new segment, positions restarting at 0) in the next row of
the same domain. Rows therefore have no padding except possibly the very last
row of a finite pass, and no document is ever dropped or truncated. Each
segment's targets are its own inputs shifted by one, so no target crosses a
document boundary. Rows follow docs/architecture.md's batch contract:

    inputs, targets, segment_ids, positions: int32 [seq_len]; domain_id: int32 []

With a teacher cache (`row_extras`, ddk_jax/teacher_cache.py) each domain's rows also
carry `cache_row`, the row's index in that domain's packed row stream on this process
(counted in the iterator state, so it resumes exactly), plus whatever `row_extras`
looks up for it (the cached teacher). Without it, rows and states are as above.

Validation, per domain: the same without shuffle/repeat (one deterministic
pass over this process's slice), materialised once, and served as batches of
B rows padded with all-zero rows (segment_ids 0 = no loss) so that every
process yields the same number of batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
from grain.experimental import ConcatThenSplitIterDataset
import numpy as np

from ddk_jax.data.config import DataConfigError, domain_seed, domain_specs
from ddk_jax.data.config import initial_weights, require_key, with_defaults
from ddk_jax.data.mixture import DynamicMixtureDatasetIterator
from ddk_jax.data.mixture import DynamicMixtureIterDataset, stack_rows
from ddk_jax.data.prepare import load_manifest
from ddk_jax.data.tokenizer import load_tokenizer_from_config

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "domain_id")


def _process(process_index: int | None, process_count: int | None
             ) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else (
        process_index)
    process_count = jax.process_count() if process_count is None else (
        process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count}).")
  return int(process_index), int(process_count)


# ---------------------------------------------------------------- documents --


def domain_documents(prepared_dir: str, manifest: dict[str, Any], domain: str,
                     split: str, *, process_index: int = 0,
                     process_count: int = 1) -> grain.MapDataset:
  """This process's documents of a domain split: int32 token arrays.

  Process p gets documents p, p + P, p + 2P, ... of the split (P = process
  count), so processes read disjoint documents that together cover the split.
  """
  entry = manifest["domains"][domain][split]
  paths = [os.path.join(os.fspath(prepared_dir), s["file"])
           for s in entry["shards"] if s["documents"] > 0]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise DataConfigError(
        f"domain {domain!r} ({split}): prepared shard {missing[0]} is missing; "
        "rerun python -m ddk_jax.data.prepare with this config.")
  dtype = np.dtype(manifest["dtype"])
  source = grain.sources.ArrayRecordDataSource(paths)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  return ds.map(lambda raw: np.frombuffer(raw, dtype=dtype).astype(np.int32))


def _to_pair(doc: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": doc[:-1], "targets": doc[1:]}


# ------------------------------------------------------------------ packing --


class _PackedRowsIterator(grain.DatasetIterator):
  """Renames grain's packed features to the batch contract, adds domain_id.

  It also makes the packer's state survive a JSON round trip: grain 0.2.18's
  ConcatThenSplit keeps `remainder_slices` as tuples and compares them with a
  tuple sentinel, so the lists json.loads gives back would be misread as a
  pending remainder.
  """

  def __init__(self, parent: grain.DatasetIterator, domain_id: int):
    super().__init__(parent)
    self._domain_id = np.asarray(domain_id, dtype=np.int32)

  def __next__(self) -> dict[str, np.ndarray]:
    row = next(self._parent)
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "segment_ids": row["inputs_segment_ids"],
        "positions": row["inputs_positions"],
        "domain_id": self._domain_id,
    }

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    state = dict(state)
    if "remainder_slices" in state:
      state["remainder_slices"] = {
          k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state(state)


class PackedRowsIterDataset(grain.IterDataset):
  """Packs {"inputs", "targets"} documents into fixed rows of one domain."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int,
               domain_id: int):
    super().__init__(parent)
    self._packed = ConcatThenSplitIterDataset(
        parent, length_struct={"inputs": seq_len, "targets": seq_len})
    self._domain_id = domain_id

  def __iter__(self) -> _PackedRowsIterator:
    return _PackedRowsIterator(self._packed.__iter__(), self._domain_id)


# The key a keyed row iterator keeps its row count under in its state.
CACHE_ROW = "cache_row"


class _KeyedRowsIterator(grain.DatasetIterator):
  """Numbers a domain's packed rows (`cache_row`: 0, 1, ... over the iterator's whole life,
  across epochs) and adds `row_extras(domain_id, row_index, row)` to each row."""

  def __init__(self, parent: grain.DatasetIterator, domain_id: int, row_extras):
    super().__init__(parent)
    self._domain_id = int(domain_id)
    self._extras = row_extras
    self._row = 0

  def __next__(self) -> dict[str, np.ndarray]:
    row = next(self._parent)
    if self._extras is not None:
      row = {**row, **self._extras(self._domain_id, self._row, row)}
    row[CACHE_ROW] = np.asarray(self._row, np.int32)
    self._row += 1
    return row

  def get_state(self) -> dict[str, Any]:
    return {**self._parent.get_state(), CACHE_ROW: self._row}

  def set_state(self, state: dict[str, Any]) -> None:
    state = dict(state)
    self._row = int(state.pop(CACHE_ROW))
    self._parent.set_state(state)


class KeyedRowsIterDataset(grain.IterDataset):
  """A domain's packed rows, each with its index in the domain's row stream (and extras)."""

  def __init__(self, parent: PackedRowsIterDataset, *, domain_id: int, row_extras=None):
    super().__init__(parent)
    self._domain_id = domain_id
    self._extras = row_extras

  def __iter__(self) -> _KeyedRowsIterator:
    return _KeyedRowsIterator(self._parent.__iter__(), self._domain_id, self._extras)


def domain_rows(prepared_dir: str, manifest: dict[str, Any], domain: str, *,
                domain_id: int, split: str = "train", seq_len: int,
                process_index: int = 0, process_count: int = 1,
                seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None,
                read_options: grain.ReadOptions | None = None,
                keyed: bool = False, row_extras=None) -> grain.IterDataset:
  """Packed rows of one domain for this process (infinite if num_epochs=None).

  `keyed` (implied by `row_extras`) numbers the rows (`cache_row`) and adds
  `row_extras(domain_id, row_index, row)` (a dict of arrays) to each.
  """
  docs = domain_documents(prepared_dir, manifest, domain, split,
                          process_index=process_index,
                          process_count=process_count)
  if len(docs) == 0:
    n = manifest["domains"][domain][split]["documents"]
    raise DataConfigError(
        f"domain {domain!r} ({split}) has {n} documents, fewer than the "
        f"{process_count} processes; process {process_index} would get none. "
        "Add data to this domain.")
  if shuffle:
    docs = docs.shuffle(seed=domain_seed(seed, domain, "shuffle"))
  if num_epochs != 1:
    docs = docs.repeat(num_epochs)
  it = docs.map(_to_pair).to_iter_dataset(
      read_options or grain.ReadOptions(num_threads=0))
  rows = PackedRowsIterDataset(it, seq_len=seq_len, domain_id=domain_id)
  if keyed or row_extras is not None:
    return KeyedRowsIterDataset(rows, domain_id=domain_id, row_extras=row_extras)
  return rows


# -------------------------------------------------------------------- train --


def _read_options(cfg: Any) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=int(cfg.num_threads),
                           prefetch_buffer_size=int(cfg.prefetch_buffer_size))


def _manifest(cfg: Any, manifest: dict[str, Any] | None, tokenizer: Any):
  names = [s.name for s in domain_specs(cfg)]
  prepared_dir = require_key(cfg, "prepared_dir")
  if manifest is not None:
    return manifest
  tok = tokenizer if tokenizer is not None else load_tokenizer_from_config(cfg)
  return load_manifest(prepared_dir, tok, domains=names)


def build_train_dataset(data_cfg: Any, *, process_index: int | None = None,
                        process_count: int | None = None,
                        weights: Sequence[float] | None = None,
                        manifest: dict[str, Any] | None = None,
                        tokenizer: Any = None,
                        num_epochs: int | None = None,
                        row_extras=None) -> DynamicMixtureIterDataset:
  """The train mixture of packed rows for one process.

  Args:
    data_cfg: the `data` config section.
    process_index, process_count: default to jax.process_index() /
      jax.process_count(); pass them explicitly to simulate hosts.
    weights: initial mixture weights (default: the domains' `weight`s).
    manifest: an already loaded manifest (skips loading and the tokenizer
      check).
    tokenizer: the training tokenizer, checked against the manifest (default:
      loaded from data.tokenizer).
    num_epochs: None (default) repeats every domain forever; a number makes
      the domains finite (tests, one-pass analyses).
    row_extras: `f(domain_id, row_index, row) -> dict` of arrays added to
      every row (a teacher cache's lookup); rows then also carry `cache_row`.
  """
  cfg = with_defaults(data_cfg)
  specs = domain_specs(cfg)
  pi, pc = _process(process_index, process_count)
  manifest = _manifest(cfg, manifest, tokenizer)
  parents = [
      domain_rows(cfg.prepared_dir, manifest, s.name, domain_id=s.domain_id,
                  split="train", seq_len=int(cfg.seq_len), process_index=pi,
                  process_count=pc, seed=int(cfg.seed),
                  shuffle=bool(cfg.shuffle), num_epochs=num_epochs,
                  read_options=_read_options(cfg), row_extras=row_extras)
      for s in specs]
  return DynamicMixtureIterDataset(
      parents, weights if weights is not None else initial_weights(cfg),
      seed=int(cfg.seed), process_index=pi, names=[s.name for s in specs])


def build_train_iterator(data_cfg: Any, **kwargs) -> (
    DynamicMixtureDatasetIterator):
  """`iter(build_train_dataset(...))`: call `next(it)` for a row,
  `it.next_batch(B)` for a stacked batch, `it.set_weights(w)` between steps,
  `it.get_state()` / `it.set_state(s)` for checkpoints."""
  return iter(build_train_dataset(data_cfg, **kwargs))


# --------------------------------------------------------------- validation --


def _padding_row(seq_len: int, domain_id: int) -> dict[str, np.ndarray]:
  z = np.zeros(seq_len, np.int32)
  return {"inputs": z, "targets": z, "segment_ids": z, "positions": z,
          "domain_id": np.asarray(domain_id, np.int32)}


@dataclasses.dataclass
class ValidationBatches:
  """One domain's validation rows for this process, served as fixed batches.

  Calling it returns a fresh generator of `num_batches` batches (dicts of
  [batch_size, seq_len] int32 arrays plus domain_id [batch_size]); the last
  ones are padded with all-zero rows. `num_batches` is the same on every
  process (the maximum over processes), so collective eval steps line up.
  """

  domain: str
  domain_id: int
  batch_size: int
  seq_len: int
  rows: list[dict[str, np.ndarray]]
  num_batches: int
  num_target_tokens: int  # loss tokens on this process
  global_num_target_tokens: int  # over all processes

  def __call__(self) -> Iterator[dict[str, np.ndarray]]:
    pad = _padding_row(self.seq_len, self.domain_id)
    for b in range(self.num_batches):
      chunk = self.rows[b * self.batch_size:(b + 1) * self.batch_size]
      chunk = chunk + [pad] * (self.batch_size - len(chunk))
      yield stack_rows(chunk)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self()


def _split_row_cap(row_counts: list[int], max_rows: int) -> list[int]:
  """Rows each process keeps so the total is min(max_rows, all rows), spread
  evenly: the cap is handed out one row per process at a time (water-filling)."""
  kept = [0] * len(row_counts)
  left = min(max_rows, sum(row_counts))
  while left:
    open_ = [p for p, n in enumerate(row_counts) if kept[p] < n]
    share = max(1, left // len(open_))
    for p in open_:
      take = min(share, row_counts[p] - kept[p], left)
      kept[p] += take
      left -= take
      if not left:
        break
  return kept


def build_validation(data_cfg: Any, *, batch_size: int,
                     process_index: int | None = None,
                     process_count: int | None = None,
                     manifest: dict[str, Any] | None = None,
                     tokenizer: Any = None,
                     max_rows: int = 0) -> dict[str, ValidationBatches]:
  """Per-domain validation batches for this process, in domain order.

  `max_rows` > 0 keeps at most that many rows (of seq_len tokens) per domain
  over all processes: the first ones of each process's shard, split as evenly
  as the shards allow, so the subset is fixed for the whole run (DDK compares
  the student with the teacher's cached losses on the same rows).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if max_rows < 0:
    raise ValueError(f"max_rows must be >= 0 (0: every row), got {max_rows}.")
  cfg = with_defaults(data_cfg)
  specs = domain_specs(cfg)
  pi, pc = _process(process_index, process_count)
  manifest = _manifest(cfg, manifest, tokenizer)
  seq_len = int(cfg.seq_len)
  out = {}
  for s in specs:
    # Concat-then-split fills every row but the last, so a process with T
    # target tokens has ceil(T / seq_len) rows; counted for every process
    # (cheap: validation sets are small) to agree on the batch count.
    tokens = [
        int(sum(len(d) - 1 for d in domain_documents(
            cfg.prepared_dir, manifest, s.name, "validation",
            process_index=p, process_count=pc)))
        for p in range(pc)]
    rows = []
    if tokens[pi]:
      rows = list(domain_rows(
          cfg.prepared_dir, manifest, s.name, domain_id=s.domain_id,
          split="validation", seq_len=seq_len, process_index=pi,
          process_count=pc, shuffle=False, num_epochs=1))
    assert len(rows) == math.ceil(tokens[pi] / seq_len), (s.name, len(rows))
    row_counts = [math.ceil(t / seq_len) for t in tokens]
    if max_rows:
      kept = _split_row_cap(row_counts, max_rows)
      # Every row but a process's last is full, so a cut shard keeps full rows only.
      tokens = [t if k == n else k * seq_len
                for t, k, n in zip(tokens, kept, row_counts)]
      rows, row_counts = rows[:kept[pi]], kept
    num_batches = max(math.ceil(n / batch_size) for n in row_counts)
    out[s.name] = ValidationBatches(
        domain=s.name, domain_id=s.domain_id, batch_size=batch_size,
        seq_len=seq_len, rows=rows, num_batches=num_batches,
        num_target_tokens=tokens[pi], global_num_target_tokens=sum(tokens))
  return out
