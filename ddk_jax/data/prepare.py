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

Hold-out: a domain without validation sources gets `num_validation_docs`
documents drawn (without replacement, seeded by data.seed and the domain name)
from its train stream; they are removed from train.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
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


# ------------------------------------------------------------- file helpers --


def _tmp_tag() -> str:
  # Host and pid: concurrent prepares (several hosts on a shared file system)
  # never write the same temporary file.
  return f".tmp-{socket.gethostname()}-{os.getpid()}"


def _atomic_write_json(path: str, obj: Any) -> None:
  tmp = path + _tmp_tag()
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


# ------------------------------------------------------------- split writer --


def _write_split(
    *, domain: str, split: str, texts: Iterator[str], out_dir: str,
    tok: TextTokenizer, docs_per_shard: int, batch_size: int,
    fingerprint: str, total: int | None, progress: bool,
    source_names: list[str]) -> dict[str, Any]:
  """Writes one split's shards (skipping finished ones); returns its summary."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  _remove_temp_files(out_dir)
  dtype = tok.storage_dtype()
  bar = tqdm(total=total, unit="doc", desc=f"{domain}/{split}",
             disable=not progress, file=sys.stderr, leave=False)
  shards = []
  for k in itertools.count():
    chunk_iter = itertools.islice(texts, docs_per_shard)
    base = os.path.join(out_dir, _shard_name(k))
    marker = _read_json(base + ".json")
    if (marker is not None and marker.get("fingerprint") == fingerprint
        and os.path.exists(base + ".array_record")):
      # Finished earlier: consume its documents without tokenizing them.
      n = sum(1 for _ in chunk_iter)
      if n != marker["raw_documents"]:
        raise DataConfigError(
            f"domain {domain!r} ({split}): shard {base} holds "
            f"{marker['raw_documents']} source documents but the sources now "
            f"give {n} at that position; the inputs changed. Delete "
            f"{out_dir} (or use a fresh data.prepared_dir) and rerun.")
      bar.update(n)
      shards.append(marker)
      continue
    chunk = list(chunk_iter)
    if not chunk:
      break
    tmp = f"{base}.array_record{_tmp_tag()}"
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    docs = tokens = skipped = 0
    try:
      for i in range(0, len(chunk), batch_size):
        batch = chunk[i:i + batch_size]
        texts_nonempty = [t for t in batch if t.strip()]
        skipped += len(batch) - len(texts_nonempty)
        for arr in tok.encode_documents(texts_nonempty, dtype=dtype):
          writer.write(arr.tobytes())
          docs += 1
          tokens += int(arr.size)
        bar.update(len(batch))
    finally:
      writer.close()
    os.replace(tmp, base + ".array_record")
    marker = {
        "file": os.path.join(domain, split, _shard_name(k) + ".array_record"),
        "fingerprint": fingerprint, "raw_documents": len(chunk),
        "documents": docs, "tokens": tokens, "skipped_empty": skipped,
    }
    # The marker is what makes the shard "finished"; it is written last.
    _atomic_write_json(base + ".json", marker)
    shards.append(marker)
  bar.close()

  docs = sum(s["documents"] for s in shards)
  if docs == 0:
    raw = sum(s["raw_documents"] for s in shards)
    what = ("no documents" if raw == 0 else
            f"only empty documents ({raw} skipped)")
    hint = ("lower num_validation_docs or give validation files"
            if split == "validation" else "check the paths and text_field")
    raise DataConfigError(
        f"domain {domain!r}: the {split} split has {what}; sources: "
        f"{source_names}. Fix: {hint}.")
  return {
      "documents": docs,
      "tokens": sum(s["tokens"] for s in shards),
      # Loss tokens: each document of n ids gives n - 1 (input, target) pairs.
      "target_tokens": sum(s["tokens"] - s["documents"] for s in shards),
      "skipped_empty": sum(s["skipped_empty"] for s in shards),
      "shards": [{"file": s["file"], "documents": s["documents"],
                  "tokens": s["tokens"]} for s in shards],
  }


# -------------------------------------------------------------- per domain --


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


def prepare_domain(spec: DomainSpec, tok: TextTokenizer, data_cfg: Any, *,
                   progress: bool = True,
                   previous: dict[str, Any] | None = None) -> dict[str, Any]:
  """Prepares one domain (both splits); returns its manifest entry.

  `previous` is the domain's entry in an existing manifest: when its
  fingerprint matches and its shards exist, it is returned as is (a no-op
  rerun does not even read the sources).
  """
  data_cfg = with_defaults(data_cfg)
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
    return previous
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
    _atomic_write_json(info_path, info)

  def texts(split: str) -> Iterator[str]:
    if not spec.holds_out_validation:
      return sources_lib.iter_split_documents(srcs[split], opts[split])
    held = set(info["holdout"])
    raw = sources_lib.iter_split_documents(srcs["train"], opts[split])
    if split == "validation":
      return _select(raw, held, keep_held=True, stop_after=max(held))
    return _select(raw, held, keep_held=False)

  def total(split: str) -> int | None:
    if not spec.holds_out_validation:
      return None
    n = len(info["holdout"])
    return n if split == "validation" else info["source_documents"] - n

  entry: dict[str, Any] = {"fingerprint": fingerprint}
  for split in SPLITS:
    source_names = [s.describe() for s in (
        srcs["train"] if spec.holds_out_validation else srcs[split])]
    entry[split] = _write_split(
        domain=spec.name, split=split, texts=texts(split),
        out_dir=os.path.join(domain_dir, split), tok=tok,
        docs_per_shard=int(data_cfg.docs_per_shard),
        batch_size=int(data_cfg.get("tokenize_batch_size", 512)),
        fingerprint=fingerprint, total=total(split), progress=progress,
        source_names=source_names)
    entry[split]["sources"] = source_names
  return entry


# ----------------------------------------------------------------- manifest --


def prepare(data_cfg: Any, *, progress: bool = True,
            log: Callable[[str], None] | None = print) -> dict[str, Any]:
  """Prepares every domain of `data_cfg`; returns the manifest (idempotent)."""
  data_cfg = with_defaults(data_cfg)
  specs = domain_specs(data_cfg)
  prepared_dir = os.fspath(require_key(data_cfg, "prepared_dir"))
  if "://" in prepared_dir:
    raise DataConfigError(
        f"data.prepared_dir={prepared_dir}: prepared shards are written and read on a local disk; "
        "prepare to a local directory, or to a bucket mounted with gcsfuse (set data.prepared_dir to "
        "the mounted path).")
  tok = load_tokenizer_from_config(data_cfg)
  os.makedirs(prepared_dir, exist_ok=True)
  old = _read_json(os.path.join(prepared_dir, MANIFEST))
  old_ok = (old is not None and old.get("format_version") == FORMAT_VERSION
            and old["tokenizer"]["hash"] == tok.hash)
  domains = {}
  for spec in specs:
    previous = old["domains"].get(spec.name) if old_ok else None
    domains[spec.name] = prepare_domain(spec, tok, data_cfg,
                                        progress=progress, previous=previous)
    if log:
      e = domains[spec.name]
      log(f"[prepare] {spec.name}: train {e['train']['documents']} docs "
          f"{e['train']['tokens']} tokens, validation "
          f"{e['validation']['documents']} docs "
          f"{e['validation']['tokens']} tokens")
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
  if old != manifest:
    _atomic_write_json(os.path.join(prepared_dir, MANIFEST), manifest)
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
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {' '.join(argv[1:])}; config overrides are written "
                         "--config.<key>=<value> (keys: docs/config.md).")
  cfg = flags.FLAGS.config
  if cfg is None:
    raise cli.UsageError("--config is required: the experiment file whose `data` section to prepare, e.g. "
                         "--config=configs/demo.py (keys: docs/config.md and docs/data.md).")
  if "data" not in cfg:
    raise cli.UsageError(f"{flags.FLAGS['config'].config_filename}: the config has no `data` section; see "
                         "docs/data.md.")
  cli.setup_logging()
  try:
    if cfg.data.get("demo_corpus_dir"):  # the demo config's corpus is generated, then prepared
      from ddk_jax.demo import corpus  # pylint: disable=g-import-not-at-top
      corpus.ensure_demo_corpus(cfg.data.demo_corpus_dir)
    manifest = prepare(cfg.data, progress=True)
  except (ValueError, OSError) as e:  # DataConfigError and unreadable/unwritable files
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
