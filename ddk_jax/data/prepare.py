r"""Tokenizes every domain once into ArrayRecord shards (+ manifest.json).

    python -m ddk_jax.data.prepare --config=configs/demo.py [--config.data.seq_len=...]

The config file's `get_config()` must have a `data` section (see
ddk_jax/data/config.py). Layout written under `data.prepared_dir`:

    manifest.json                      written last: preparation is complete
    <domain>/domain.json               fingerprint of the inputs + hold-out plan
    <domain>/<split>/shard-00000.array_record   one record per document:
                                       the raw bytes of a uint16/uint32 array
                                       [BOS] + ids + [EOS]
    <domain>/<split>/shard-00000.json  the shard's "finished" marker + counts

Resumable and idempotent: shard k of a split holds the split's documents
[k * docs_per_shard, (k+1) * docs_per_shard) in source order. A shard is
written under a temporary name, renamed, and only then gets its .json marker;
a rerun skips shards whose marker matches and redoes any other. A rerun with
different inputs, tokenizer or settings for an existing domain fails instead
of mixing old and new shards.

Parallel: this process reads the sources in order and cuts them into shards;
`data.num_prepare_workers` worker processes (spawned, one per core by default)
tokenize and write whole shards. A shard's bytes depend only on its documents,
so the output is the same whatever the number of workers. On several hosts
(JAX's distributed runtime), shard k of the s-th split belongs to host
(k + s) % process_count; each host writes its own shards into the shared
prepared_dir, all hosts meet at a barrier and check they see every shard, and
process 0 writes the manifest.

Hold-out: a domain without validation sources gets `num_validation_docs`
documents drawn (without replacement, seeded by data.seed and the domain name)
from its train stream; they are removed from train.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from ddk_jax.data import sources as sources_lib
from ddk_jax.data.config import DataConfigError, DomainSpec, domain_specs
from ddk_jax.data.config import domain_seed, require_key, with_defaults
from ddk_jax.data.tokenizer import TextTokenizer, load_tokenizer_from_config

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
_WRITER_OPTIONS = "group_size:1,snappy"  # group_size 1: cheap random access.
# num_prepare_workers = 0: this much text (characters) is tokenized in this process before worker
# processes are started, so that small preparations do not pay for starting them.
_AUTO_INLINE_CHARS = 4_000_000
# Multi-host: how long a host waits for the files of the other hosts to appear in prepared_dir.
_SHARED_DIR_WAIT_S = 60.0


# ------------------------------------------------------------- file helpers --


def tmp_tag() -> str:
  """Suffix of this process's temporary files (also the teacher cache's).  Host and pid:
  concurrent writers (several hosts on a shared file system) never write the same one."""
  return f".tmp-{socket.gethostname()}-{os.getpid()}"


def write_json_atomic(path: str, obj: Any) -> None:
  """`obj` as JSON at `path`, replaced whole (fsync'ed temporary file, then rename)."""
  tmp = path + tmp_tag()
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_json(path: str) -> Any | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except json.JSONDecodeError:
    return None  # A torn marker counts as absent; the shard is redone.


def _shard_name(k: int) -> str:
  return f"shard-{k:05d}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_temp_files(directory: str) -> None:
  """Removes leftovers of interrupted runs on this host.

  Temporary files of live processes (a concurrent prepare) are kept.
  """
  mine = f".tmp-{socket.gethostname()}-"
  for name in os.listdir(directory):
    if mine not in name:
      continue
    pid = name.rsplit("-", 1)[-1]
    if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
      continue
    try:
      os.remove(os.path.join(directory, name))
    except FileNotFoundError:
      pass


# -------------------------------------------------------------- fingerprint --


def _fingerprint(spec: DomainSpec, srcs: dict[str, list[sources_lib.Source]],
                 tok: TextTokenizer, data_cfg: Any) -> str:
  blob = {
      "format_version": FORMAT_VERSION,
      "tokenizer_hash": tok.hash,
      "dtype": tok.storage_dtype().name,
      "docs_per_shard": int(data_cfg.docs_per_shard),
      "seed": int(data_cfg.seed),
      "on_decode_error": data_cfg.get("on_decode_error", "error"),
      "spec": {k: v for k, v in spec.to_json().items()
               if k not in ("weight", "domain_id")},
      "sources": {split: [sources_lib.source_fingerprint(s) for s in lst]
                  for split, lst in srcs.items()},
  }
  return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------- shard jobs --


class PrepareError(RuntimeError):
  """Preparation stopped (a worker process died, or another host failed); a rerun resumes."""


@dataclasses.dataclass(frozen=True)
class _ShardJob:
  """One shard to tokenize and write: all a worker process is given."""

  domain: str
  split: str
  index: int
  out_dir: str
  fingerprint: str
  dtype: str
  batch_size: int
  texts: list[str]

  @property
  def base(self) -> str:
    return os.path.join(self.out_dir, _shard_name(self.index))

  def describe(self) -> str:
    return f"{self.domain}/{self.split}/{_shard_name(self.index)}"


def _write_shard(job: _ShardJob, tok: TextTokenizer,
                 on_batch: Callable[[int], Any] | None = None) -> dict[str, Any]:
  """Writes one shard under a temporary name, renames it, then writes its marker; returns the marker."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  tmp = f"{job.base}.array_record{tmp_tag()}"
  dtype = np.dtype(job.dtype)
  writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
  docs = tokens = skipped = 0
  try:
    for i in range(0, len(job.texts), job.batch_size):
      batch = job.texts[i:i + job.batch_size]
      texts_nonempty = [t for t in batch if t.strip()]
      skipped += len(batch) - len(texts_nonempty)
      for arr in tok.encode_documents(texts_nonempty, dtype=dtype):
        writer.write(arr.tobytes())
        docs += 1
        tokens += int(arr.size)
      if on_batch is not None:
        on_batch(len(batch))
  finally:
    writer.close()
  os.replace(tmp, job.base + ".array_record")
  marker = {
      "file": os.path.join(job.domain, job.split, _shard_name(job.index) + ".array_record"),
      "fingerprint": job.fingerprint, "raw_documents": len(job.texts),
      "documents": docs, "tokens": tokens, "skipped_empty": skipped,
  }
  # The marker is what makes the shard "finished"; it is written last.
  write_json_atomic(job.base + ".json", marker)
  return marker


_worker_tokenizer: TextTokenizer | None = None


def _init_worker(tok: TextTokenizer, threads: int) -> None:
  """Runs once in each worker process."""
  global _worker_tokenizer
  # The pool already spreads the work over the cores: each worker's tokenizer gets its share of them.
  if threads <= 1:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
  else:
    os.environ["RAYON_NUM_THREADS"] = str(threads)
  _worker_tokenizer = tok


def _run_shard_job(job: _ShardJob) -> dict[str, Any]:
  """The function a worker process runs for each shard."""
  return _write_shard(job, _worker_tokenizer)


def _usable_cpus() -> int:
  if hasattr(os, "sched_getaffinity"):
    return max(1, len(os.sched_getaffinity(0)))
  return max(1, os.cpu_count() or 1)


def _done(result: Any) -> concurrent.futures.Future:
  fut: concurrent.futures.Future = concurrent.futures.Future()
  fut.set_result(result)
  return fut


class _ShardRunner:
  """Writes shards in this process, or in a pool of worker processes.

  The pool is started on the first shard that needs tokenizing (a rerun with every shard finished starts
  none). In automatic mode (num_prepare_workers = 0) the first `_AUTO_INLINE_CHARS` characters of text
  are tokenized in this process, so that small preparations do not pay for starting the workers. At most
  workers + 1 shards are in flight, which bounds the memory held by texts waiting for a worker.
  """

  def __init__(self, tok: TextTokenizer, num_workers: int, auto: bool, progress: Callable[[int], Any]):
    self._tok = tok
    self._num_workers = num_workers
    self._auto = auto
    self._progress = progress
    self._inline_chars = 0
    self._pool: concurrent.futures.ProcessPoolExecutor | None = None
    self._in_flight: dict[concurrent.futures.Future, _ShardJob] = {}

  def _in_process(self, job: _ShardJob) -> bool:
    if self._pool is not None:
      return False
    if self._num_workers <= 1:
      return True
    if not self._auto:
      return False
    size = sum(len(t) for t in job.texts)
    if self._inline_chars + size > _AUTO_INLINE_CHARS:
      return False
    self._inline_chars += size
    return True

  def submit(self, job: _ShardJob) -> concurrent.futures.Future:
    if self._in_process(job):
      return _done(_write_shard(job, self._tok, on_batch=self._progress))
    if self._pool is None:
      # Not fork: the parent may hold JAX/grain threads and locks; spawned workers start clean.
      self._pool = concurrent.futures.ProcessPoolExecutor(
          max_workers=self._num_workers, mp_context=multiprocessing.get_context("spawn"),
          initializer=_init_worker,
          initargs=(self._tok, max(1, _usable_cpus() // self._num_workers)))
    self._drain(self._num_workers)
    fut = self._pool.submit(_run_shard_job, job)
    self._in_flight[fut] = job
    n = len(job.texts)
    fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self._progress(n))
    return fut

  def _drain(self, limit: int) -> None:
    """Waits until at most `limit` shards are in flight; raises the error of a failed one."""
    while True:
      for fut in [f for f in self._in_flight if f.done()]:
        _shard_result(fut, self._in_flight.pop(fut))
      if len(self._in_flight) <= limit:
        return
      concurrent.futures.wait(list(self._in_flight), return_when=concurrent.futures.FIRST_COMPLETED)

  def close(self) -> None:
    """Stops the pool; shards being written are finished, queued ones dropped."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None


def _shard_result(fut: concurrent.futures.Future, job: _ShardJob | str) -> dict[str, Any]:
  """A shard's marker, or a PrepareError naming it when its worker process died."""
  try:
    return fut.result()
  except BrokenProcessPool as e:
    what = job.describe() if isinstance(job, _ShardJob) else job
    raise PrepareError(
        f"a prepare worker process died (killed by a signal, or out of memory) while shards such as {what} "
        "were being written; finished shards are kept, so rerunning prepare resumes. If memory ran out, "
        "lower data.num_prepare_workers or data.docs_per_shard.") from e


# ------------------------------------------------------------------ planning --


@dataclasses.dataclass
class _Slot:
  """One shard of a split: this host's (a future giving its marker) or another host's."""

  index: int
  raw_documents: int
  owner: int
  base: str
  future: concurrent.futures.Future | None = None


@dataclasses.dataclass
class _SplitPlan:
  domain: str
  split: str
  fingerprint: str
  source_names: list[str]
  slots: list[_Slot]


@dataclasses.dataclass
class _DomainPlan:
  name: str
  entry: dict[str, Any] | None = None  # complete already (from the old manifest)
  fingerprint: str = ""
  splits: list[_SplitPlan] = dataclasses.field(default_factory=list)

  def ready(self) -> bool:
    return self.entry is not None or all(
        s.future is not None and s.future.done() for sp in self.splits for s in sp.slots)


def _holdout_indices(spec: DomainSpec, train_sources, opts, seed: int
                     ) -> tuple[int, list[int]]:
  total = sum(sources_lib.count_documents(s, opts) for s in train_sources)
  n = spec.num_validation_docs
  if total == 0:
    raise DataConfigError(
        f"domain {spec.name!r}: the train sources contain no documents: "
        f"{[s.describe() for s in train_sources]}. Fix the paths.")
  if total <= n:
    raise DataConfigError(
        f"domain {spec.name!r}: has {total} documents, not enough to hold out "
        f"num_validation_docs={n} and keep some for training. Fix: lower "
        "num_validation_docs for this domain or give `validation` files.")
  rng = np.random.default_rng(domain_seed(seed, spec.name, "holdout"))
  held = np.sort(rng.choice(total, size=n, replace=False))
  return total, [int(i) for i in held]


def _select(texts: Iterable[str], held: set[int], keep_held: bool,
            stop_after: int | None = None) -> Iterator[str]:
  for i, t in enumerate(texts):
    if stop_after is not None and i > stop_after:
      return
    if (i in held) == keep_held:
      yield t


def _is_complete(entry: dict[str, Any] | None, fingerprint: str,
                 prepared_dir: str) -> bool:
  if not entry or entry.get("fingerprint") != fingerprint:
    return False
  return all(os.path.exists(os.path.join(prepared_dir, sh["file"]))
             for split in SPLITS for sh in entry[split]["shards"])


def _schedule_split(plan: _SplitPlan, texts: Iterator[str], out_dir: str, *, runner: _ShardRunner,
                    tok: TextTokenizer, data_cfg: Any, seq: int, process_index: int, process_count: int,
                    progress: Callable[[int], Any]) -> None:
  """Reads a split's documents shard by shard and hands this host's unfinished shards to the runner.

  Shard k belongs to host (k + seq) % process_count (seq numbers the splits, so that splits of one shard
  are spread over the hosts too). Every host reads every document, because a shard's documents are only
  found by reading the ones before it; tokenizing is what is split.
  """
  os.makedirs(out_dir, exist_ok=True)
  _remove_temp_files(out_dir)
  docs_per_shard = int(data_cfg.docs_per_shard)
  for k in itertools.count():
    chunk_iter = itertools.islice(texts, docs_per_shard)
    base = os.path.join(out_dir, _shard_name(k))
    owner = (k + seq) % process_count
    if owner != process_index:
      n = sum(1 for _ in chunk_iter)
      if not n:
        break
      plan.slots.append(_Slot(k, n, owner, base))
      continue
    marker = _read_json(base + ".json")
    if (marker is not None and marker.get("fingerprint") == plan.fingerprint
        and os.path.exists(base + ".array_record")):
      # Finished earlier: consume its documents without tokenizing them.
      n = sum(1 for _ in chunk_iter)
      _check_raw_count(plan, base, marker, n)
      progress(n)
      plan.slots.append(_Slot(k, n, owner, base, _done(marker)))
      continue
    chunk = list(chunk_iter)
    if not chunk:
      break
    job = _ShardJob(domain=plan.domain, split=plan.split, index=k, out_dir=out_dir,
                    fingerprint=plan.fingerprint, dtype=tok.storage_dtype().name,
                    batch_size=int(data_cfg.get("tokenize_batch_size", 512)), texts=chunk)
    plan.slots.append(_Slot(k, len(chunk), owner, base, runner.submit(job)))


def _check_raw_count(plan: _SplitPlan, base: str, marker: dict[str, Any], n: int) -> None:
  if n != marker["raw_documents"]:
    raise DataConfigError(
        f"domain {plan.domain!r} ({plan.split}): shard {base} holds "
        f"{marker['raw_documents']} source documents but the sources now "
        f"give {n} at that position; the inputs changed. Delete "
        f"{os.path.dirname(base)} (or use a fresh data.prepared_dir) and rerun.")


def _schedule_domain(spec: DomainSpec, seq: int, *, tok: TextTokenizer, data_cfg: Any,
                     previous: dict[str, Any] | None, **kw) -> _DomainPlan:
  """Checks a domain's inputs, fixes its hold-out, and schedules its shards (both splits).

  `previous` is the domain's entry in an existing manifest: when its fingerprint matches and its shards
  exist, it is used as is (a no-op rerun does not even read the sources).
  """
  prepared_dir = os.fspath(require_key(data_cfg, "prepared_dir"))
  srcs = {split: sources_lib.resolve_sources(spec, split) for split in SPLITS}
  train_files = {s.describe() for s in srcs["train"]}
  overlap = [s.describe() for s in srcs["validation"]
             if s.describe() in train_files]
  if overlap:
    raise DataConfigError(
        f"domain {spec.name!r}: {overlap} are both train and validation "
        "sources; validation data must be held out. Remove them from one "
        "list.")
  fingerprint = _fingerprint(spec, srcs, tok, data_cfg)
  if _is_complete(previous, fingerprint, prepared_dir):
    return _DomainPlan(spec.name, entry=previous)
  domain_dir = os.path.join(prepared_dir, spec.name)
  os.makedirs(domain_dir, exist_ok=True)
  info_path = os.path.join(domain_dir, "domain.json")
  info = _read_json(info_path)
  if info is not None and info.get("fingerprint") != fingerprint:
    raise DataConfigError(
        f"domain {spec.name!r}: {domain_dir} was prepared from different "
        "sources, tokenizer or settings. Delete that directory (or use a "
        "fresh data.prepared_dir) and rerun prepare.")
  opts = {split: sources_lib.ReadOptions.for_domain(spec, split, data_cfg)
          for split in SPLITS}
  if info is None:
    info = {"fingerprint": fingerprint, "name": spec.name}
    if spec.holds_out_validation:
      total, held = _holdout_indices(spec, srcs["train"], opts["train"],
                                     int(data_cfg.seed))
      info.update(source_documents=total, holdout=held)
    # Identical on every host: concurrent writers replace it with the same content.
    write_json_atomic(info_path, info)

  def texts(split: str) -> Iterator[str]:
    if not spec.holds_out_validation:
      return sources_lib.iter_split_documents(srcs[split], opts[split])
    held = set(info["holdout"])
    raw = sources_lib.iter_split_documents(srcs["train"], opts[split])
    if split == "validation":
      return _select(raw, held, keep_held=True, stop_after=max(held))
    return _select(raw, held, keep_held=False)

  plan = _DomainPlan(spec.name, fingerprint=fingerprint)
  for i, split in enumerate(SPLITS):
    source_names = [s.describe() for s in (
        srcs["train"] if spec.holds_out_validation else srcs[split])]
    split_plan = _SplitPlan(spec.name, split, fingerprint, source_names, [])
    plan.splits.append(split_plan)
    _schedule_split(split_plan, texts(split), os.path.join(domain_dir, split), tok=tok, data_cfg=data_cfg,
                    seq=2 * seq + i, **kw)
  return plan


# ----------------------------------------------------------------- summaries --


def _split_summary(plan: _SplitPlan, shards: list[dict[str, Any]]) -> dict[str, Any]:
  docs = sum(s["documents"] for s in shards)
  if docs == 0:
    raw = sum(s["raw_documents"] for s in shards)
    what = ("no documents" if raw == 0 else
            f"only empty documents ({raw} skipped)")
    hint = ("lower num_validation_docs or give validation files"
            if plan.split == "validation" else "check the paths and text_field")
    raise DataConfigError(
        f"domain {plan.domain!r}: the {plan.split} split has {what}; sources: "
        f"{plan.source_names}. Fix: {hint}.")
  return {
      "documents": docs,
      "tokens": sum(s["tokens"] for s in shards),
      # Loss tokens: each document of n ids gives n - 1 (input, target) pairs.
      "target_tokens": sum(s["tokens"] - s["documents"] for s in shards),
      "skipped_empty": sum(s["skipped_empty"] for s in shards),
      "shards": [{"file": s["file"], "documents": s["documents"],
                  "tokens": s["tokens"]} for s in shards],
      "sources": plan.source_names,
  }


def _domain_entry(plan: _DomainPlan, marker: Callable[[_SplitPlan, _Slot], dict[str, Any]]
                  ) -> dict[str, Any]:
  if plan.entry is not None:
    return plan.entry
  entry: dict[str, Any] = {"fingerprint": plan.fingerprint}
  for sp in plan.splits:
    entry[sp.split] = _split_summary(sp, [marker(sp, slot) for slot in sp.slots])
  return entry


def _own_marker(sp: _SplitPlan, slot: _Slot) -> dict[str, Any]:
  return _shard_result(slot.future, f"{sp.domain}/{sp.split}/{_shard_name(slot.index)}")


# ---------------------------------------------------------------- multi-host --


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of the hosts preparing together; (0, 1) without JAX's distributed runtime."""
  jax = sys.modules.get("jax")
  distributed = jax is not None and jax.distributed.is_initialized()
  if process_index is None and process_count is None:
    if not distributed:
      return 0, 1
    return int(jax.process_index()), int(jax.process_count())
  if process_index is None or process_count is None:
    raise ValueError("prepare: pass both process_index and process_count, or neither.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"prepare: process_index {process_index} is not in [0, {process_count}).")
  if process_count > 1 and not (distributed and (jax.process_index(), jax.process_count())
                                == (process_index, process_count)):
    raise DataConfigError(
        f"prepare(process_index={process_index}, process_count={process_count}): the hosts of a multi-host "
        "prepare wait for each other through JAX's distributed runtime; call jax.distributed.initialize() on "
        "every host first (the process index and count are then taken from JAX).")
  return int(process_index), int(process_count)


def _failed_hosts(ok: bool) -> list[int]:
  """All hosts meet here (a barrier) and learn which of them failed."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = np.asarray(multihost_utils.process_allgather(np.int32(ok))).reshape(-1)
  return [i for i, f in enumerate(flags) if not f]


def _agree(error: BaseException | None, what: str) -> None:
  """Barrier: raises this host's error, or a PrepareError when another host failed."""
  failed = _failed_hosts(error is None)
  if error is not None:
    raise error
  if failed:
    raise PrepareError(
        f"prepare failed on host(s) {failed} while {what}; their logs say why. Finished shards are kept: "
        "rerun prepare on every host to resume.")


def _not_shared(prepared_dir: str, what: str) -> DataConfigError:
  return DataConfigError(
      f"data.prepared_dir={prepared_dir}: {what}. On a multi-host run prepared_dir must be one directory "
      "that every host sees (a shared file system such as NFS, or the same bucket mounted with gcsfuse on "
      "every host): each host writes its share of the shards there. For per-host local copies, prepare once "
      "on one machine (DDK_DISTRIBUTED=0 python -m ddk_jax.data.prepare) and copy the finished directory to "
      "every host.")


def _wait_for(read: Callable[[], Any], deadline: float) -> Any:
  """Polls `read` until it returns a value or the deadline passes (None): a shared file system may show
  another host's files a little late."""
  while True:
    value = read()
    if value is not None or time.monotonic() > deadline:
      return value
    time.sleep(0.2)


def _other_marker(prepared_dir: str, deadline: float) -> Callable[[_SplitPlan, _Slot], dict[str, Any]]:
  def marker(sp: _SplitPlan, slot: _Slot) -> dict[str, Any]:
    if slot.future is not None:
      return _own_marker(sp, slot)

    def read():
      m = _read_json(slot.base + ".json")
      if m is None or m.get("fingerprint") != sp.fingerprint or not os.path.exists(slot.base + ".array_record"):
        return None
      return m

    m = _wait_for(read, deadline)
    if m is None:
      raise _not_shared(prepared_dir, f"this host does not see {slot.base}.array_record (and its .json "
                        f"marker), which host {slot.owner} wrote")
    _check_raw_count(sp, slot.base, m, slot.raw_documents)
    return m
  return marker


def _without_tokenizer_path(manifest: dict[str, Any]) -> dict[str, Any]:
  tokenizer = {k: v for k, v in manifest.get("tokenizer", {}).items() if k != "path"}
  return dict(manifest, tokenizer=tokenizer)


# ----------------------------------------------------------------- manifest --


def prepare(data_cfg: Any, *, progress: bool = True,
            log: Callable[[str], None] | None = print,
            process_index: int | None = None,
            process_count: int | None = None) -> dict[str, Any]:
  """Prepares every domain of `data_cfg`; returns the manifest (idempotent).

  Shards are tokenized by `data.num_prepare_workers` worker processes; the result does not depend on
  their number. With several hosts (JAX's distributed runtime initialized, or `process_index` /
  `process_count` given), every host must call this: each writes its share of the shards into the shared
  `prepared_dir`, then process 0 writes the manifest and every host returns it.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  data_cfg = with_defaults(data_cfg)
  specs = domain_specs(data_cfg)
  prepared_dir = os.fspath(require_key(data_cfg, "prepared_dir"))
  if "://" in prepared_dir:
    raise DataConfigError(
        f"data.prepared_dir={prepared_dir}: prepared shards are written and read on a local disk; "
        "prepare to a local directory, or to a bucket mounted with gcsfuse (set data.prepared_dir to "
        "the mounted path).")
  process_index, process_count = _processes(process_index, process_count)
  tok = load_tokenizer_from_config(data_cfg)
  os.makedirs(prepared_dir, exist_ok=True)
  old = _read_json(os.path.join(prepared_dir, MANIFEST))
  old_ok = (old is not None and old.get("format_version") == FORMAT_VERSION
            and old["tokenizer"]["hash"] == tok.hash)
  workers = int(data_cfg.get("num_prepare_workers", 0))
  bar = tqdm(unit="doc", desc="prepare", disable=not progress, file=sys.stderr, leave=False)
  runner = _ShardRunner(tok, workers or _usable_cpus(), auto=workers == 0, progress=bar.update)
  domains: dict[str, Any] = {}
  plans: list[_DomainPlan] = []

  def finish(plan: _DomainPlan, marker) -> None:
    domains[plan.name] = e = _domain_entry(plan, marker)
    if log:
      log(f"[prepare] {plan.name}: train {e['train']['documents']} docs "
          f"{e['train']['tokens']} tokens, validation "
          f"{e['validation']['documents']} docs "
          f"{e['validation']['tokens']} tokens")

  error = None
  try:
    for seq, spec in enumerate(specs):
      bar.set_postfix_str(spec.name)
      previous = old["domains"].get(spec.name) if old_ok else None
      plans.append(_schedule_domain(spec, seq, tok=tok, data_cfg=data_cfg, previous=previous, runner=runner,
                                    process_index=process_index, process_count=process_count,
                                    progress=bar.update))
      while process_count == 1 and len(domains) < len(plans) and plans[len(domains)].ready():
        finish(plans[len(domains)], _own_marker)
    if process_count == 1:
      for plan in plans[len(domains):]:
        finish(plan, _own_marker)
    else:
      for plan in plans:
        for sp in plan.splits:
          for slot in sp.slots:
            if slot.future is not None:
              _own_marker(sp, slot)
  except Exception as e:  # pylint: disable=broad-except
    if process_count == 1:
      raise
    error = e  # the other hosts learn it at the barrier below instead of waiting forever
  finally:
    runner.close()
    bar.close()

  if process_count > 1:
    _agree(error, "writing their shards")
    deadline = time.monotonic() + _SHARED_DIR_WAIT_S
    try:
      for plan in plans:
        finish(plan, _other_marker(prepared_dir, deadline))
    except Exception as e:  # pylint: disable=broad-except
      error = e
    _agree(error, "collecting the shards of all hosts")
  manifest = {
      "format_version": FORMAT_VERSION,
      "tokenizer": {"hash": tok.hash, "path": tok.path,
                    "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                    "eos_id": tok.eos_id},
      "dtype": tok.storage_dtype().name,
      "seed": int(data_cfg.seed),
      "domain_order": [s.name for s in specs],
      "domains": domains,
  }
  path = os.path.join(prepared_dir, MANIFEST)
  if process_count == 1:
    if old != manifest:
      write_json_atomic(path, manifest)
    return manifest
  try:
    if process_index == 0 and old != manifest:
      write_json_atomic(path, manifest)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  _agree(error, "writing the manifest")
  if process_index != 0:
    # The tokenizer's path may differ between hosts (e.g. a local copy of a gs:// tokenizer).
    same = lambda m: m is not None and _without_tokenizer_path(m) == _without_tokenizer_path(manifest)
    seen = _wait_for(lambda: manifest if same(_read_json(path)) else None,
                     time.monotonic() + _SHARED_DIR_WAIT_S)
    if seen is None:
      raise _not_shared(prepared_dir, f"this host (process {process_index}) does not see the {MANIFEST} "
                        "that process 0 wrote")
  return manifest


def load_manifest(prepared_dir: str, tokenizer: Any = None,
                  domains: Iterable[str] | None = None) -> dict[str, Any]:
  """Reads manifest.json; refuses one made with another tokenizer.

  Args:
    prepared_dir: the data.prepared_dir of a finished `prepare`.
    tokenizer: the tokenizer training will use (a TextTokenizer, a transformers
      fast tokenizer, or a path); None skips the check.
    domains: domain names that must be present.
  """
  if "://" in os.fspath(prepared_dir):
    raise DataConfigError(
        f"data.prepared_dir={prepared_dir}: prepared shards are read with "
        "the local ArrayRecord reader; copy them to local disk or mount the "
        "bucket (e.g. gcsfuse) and point prepared_dir at the local path.")
  path = os.path.join(os.fspath(prepared_dir), MANIFEST)
  manifest = _read_json(path)
  if manifest is None:
    raise DataConfigError(
        f"no finished preparation in {prepared_dir} ({MANIFEST} is missing). "
        "Run: python -m ddk_jax.data.prepare --config=<your config>.")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise DataConfigError(
        f"{path} has format_version {manifest.get('format_version')}, this "
        f"code reads {FORMAT_VERSION}; rerun prepare into a fresh directory.")
  if tokenizer is not None:
    from ddk_jax.data.tokenizer import as_text_tokenizer  # pylint: disable=g-import-not-at-top
    tok = as_text_tokenizer(tokenizer)
    if tok.hash != manifest["tokenizer"]["hash"]:
      raise DataConfigError(
          f"{prepared_dir} was prepared with another tokenizer "
          f"({manifest['tokenizer']['path']}, hash "
          f"{manifest['tokenizer']['hash'][:12]}) than the one configured "
          f"({tok.path}, hash {tok.hash[:12]}). Token ids would be wrong: "
          "rerun prepare with this tokenizer into a fresh data.prepared_dir.")
  if domains is not None:
    missing = [d for d in domains if d not in manifest["domains"]]
    if missing:
      raise DataConfigError(
          f"domains {missing} are not in {path} (it has "
          f"{list(manifest['domains'])}). Rerun prepare with this config.")
  return manifest


def ensure_prepared(data_cfg: Any, *, progress: bool = False
                    ) -> dict[str, Any]:
  """Runs `prepare` (a no-op when everything is already prepared)."""
  return prepare(data_cfg, progress=progress, log=None)


def main(argv: list[str]) -> None:
  """`python -m ddk_jax.data.prepare --config=FILE`: prepares the config's data."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ddk_jax import cli  # pylint: disable=g-import-not-at-top
  cfg = cli.require_config(argv, flags.FLAGS.config, "the experiment file whose `data` section to prepare "
                           "(docs/data.md)")
  if "data" not in cfg:
    raise cli.UsageError(f"{flags.FLAGS['config'].config_filename}: the config has no `data` section; see "
                         "docs/data.md.")
  cli.setup_logging()
  from ddk_jax import multihost  # pylint: disable=g-import-not-at-top
  multihost.initialize_or_exit()  # on several hosts, they share the work (docs/data.md)
  try:
    if cfg.data.get("demo_corpus_dir"):  # the demo config's corpus is generated, then prepared
      from ddk_jax.demo import corpus  # pylint: disable=g-import-not-at-top
      corpus.ensure_demo_corpus(cfg.data.demo_corpus_dir)
    manifest = prepare(cfg.data, progress=True)
  except (ValueError, OSError, PrepareError) as e:  # DataConfigError and unreadable/unwritable files
    cli.fail(str(e), prog="ddk_jax.data.prepare")
  print(f"[prepare] done: {os.path.join(cfg.data.prepared_dir, MANIFEST)} "
        f"({len(manifest['domains'])} domains, tokenizer "
        f"{manifest['tokenizer']['hash'][:12]})")


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from ddk_jax import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (configs/*.py) with a `data` section. Override any key with "
      "--config.<key>=<value>; every key is documented in docs/config.md (data keys: docs/data.md).",
      lock_config=True)
  cli.run(main, prog="ddk_jax.data.prepare")
