r"""Offline teacher: run the frozen teacher once over a run's training rows and keep its top-k.

    python -m ddk_jax.teacher_cache --config=configs/X.py [--workdir=RUN] [--config.<key>=<value> ...]
    python -m ddk_jax.main --config=configs/X.py --workdir=RUN --config.teacher.source=cache \
        --config.teacher.cache_dir=DIR

The first command writes `teacher.cache_dir` (its config's teacher is the one cached); training
with `teacher.source='cache'` reads it and never loads the teacher. docs/teacher_cache.md has the
design; in short:

* **Keys.** The teacher's output for a token depends on the row it is in (segments, positions,
  the document pieces packed there), so the cache holds, for every domain and every process of
  the run's layout, the first R rows of that domain's packed row stream: the exact rows the
  domain pipeline hands out, epochs included (the stream runs across epochs as training sees it).
  An entry is keyed by (domain, process, row index in that stream); with a cache the pipelines
  number their rows (`cache_row`, kept in the iterator state) and look their entry up, whatever
  the mixture draws. R = ceil(teacher.cache_domain_share * steps * rows per process and step):
  with the default share 1.0 every domain has as many rows as the run could draw from it, so any
  mixture (DDK, its ablations, the baselines) finds its rows.
* **Values**, per target token: the teacher's top-k log-probabilities at temperature 1 and their
  ids, the log of the probability of every other id (the tail bucket, so the k+1 buckets sum to
  one) and the log-probability of the true next token; plus the teacher's per-domain validation
  losses for the rows the controller scores (whole split and `ddk.eval_max_rows`).
* **Files.** `<cache_dir>/<domain>/p<i>-of-<n>/shard-NNNNN.array_record`, one record per row,
  written under a temporary name, renamed, then marked finished by `shard-NNNNN.json`;
  `manifest.json` last. Reruns skip finished shards (resumable, idempotent), a larger `steps`
  appends rows, and each host writes its own slice on a multi-host run.

Record of one row (little-endian): uint32 CRC-32 of the row's inputs, segment_ids and positions
(the reader checks that the row it is handed is the row the entry was made from); ids [S, k]
(uint16 when the tokenizer has at most 65536 ids, else uint32); log-probabilities [S, k], tail
[S] and target log-probability [S] in `teacher.cache_dtype`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
import zlib
from typing import Any, Callable

import numpy as np

from ddk_jax.data.prepare import tmp_tag, write_json_atomic
from ddk_jax.errors import TrainingError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LAYOUT = "cache.json"  # written first: what the cache holds and its rows per shard
_SHARD_BYTES = 128 * 2**20  # automatic rows per shard: about this many bytes
_WRITER_OPTIONS = "group_size:1,uncompressed"  # one row per chunk: cheap random access
_MASKED = -1e30
# teacher.model keys that only say how the model runs, not what it computes.
_RUN_ONLY_MODEL_KEYS = ("remat", "scan_layers", "attention_impl")

_log = logging.getLogger("ddk_jax")


class TeacherCacheError(TrainingError):
  """A teacher cache that cannot be written or used; the message names the file or key and the fix."""


# ---------------------------------------------------------------------------- small helpers


def _read_json(path: str) -> Any | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _sha(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def row_crc(row: dict) -> int:
  """CRC-32 of a packed row's inputs, segment ids and positions (what the teacher's output depends on)."""
  crc = 0
  for key in ("inputs", "segment_ids", "positions"):
    crc = zlib.crc32(np.ascontiguousarray(row[key], np.int32).tobytes(), crc)
  return crc


@dataclasses.dataclass(frozen=True)
class RecordLayout:
  """How one row is stored."""

  seq_len: int
  top_k: int
  id_dtype: str
  dtype: str

  @property
  def nbytes(self) -> int:
    s, k = self.seq_len, self.top_k
    return 4 + s * k * np.dtype(self.id_dtype).itemsize + (s * k + 2 * s) * _np_dtype(self.dtype).itemsize

  def encode(self, crc: int, ids: np.ndarray, logp: np.ndarray, tail: np.ndarray, target: np.ndarray) -> bytes:
    vt = _np_dtype(self.dtype)
    return b"".join((np.uint32(crc).astype("<u4").tobytes(), np.ascontiguousarray(ids, self.id_dtype).tobytes(),
                     np.ascontiguousarray(logp, vt).tobytes(), np.ascontiguousarray(tail, vt).tobytes(),
                     np.ascontiguousarray(target, vt).tobytes()))

  def decode(self, raw: bytes) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    s, k = self.seq_len, self.top_k
    it, vt = np.dtype(self.id_dtype), _np_dtype(self.dtype)
    crc = int(np.frombuffer(raw, "<u4", 1)[0])
    o = 4
    ids = np.frombuffer(raw, it, s * k, o).reshape(s, k)
    o += s * k * it.itemsize
    logp = np.frombuffer(raw, vt, s * k, o).reshape(s, k)
    o += s * k * vt.itemsize
    tail = np.frombuffer(raw, vt, s, o)
    target = np.frombuffer(raw, vt, s, o + s * vt.itemsize)
    return crc, ids, logp, tail, target


def rows_per_domain(steps: int, global_batch_size: int, process_count: int, share: float) -> int:
  """Rows of each domain's stream each process caches: what `steps` steps could draw from one domain
  (all of a process's rows, `steps * global_batch_size / process_count`), times `share`."""
  return max(1, math.ceil(share * steps * (global_batch_size // process_count) - 1e-9))


def _shard_rows(total: int, per_shard: int) -> list[int]:
  return [min(per_shard, total - k * per_shard) for k in range(-(-total // per_shard))]


def _shard_base(cache_dir: str, domain: str, process_index: int, process_count: int, k: int) -> str:
  return os.path.join(cache_dir, domain, f"p{process_index}-of-{process_count}", f"shard-{k:05d}")


# ------------------------------------------------------------------------------- identity


def _file_samples(path: str) -> list:
  """(size, a hash of 3 x 4 KiB at the start, middle and end) of a file: cheap, and it changes when the
  file's contents are rewritten (a re-trained checkpoint), not when it is copied."""
  size = os.path.getsize(path)
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for offset in sorted({0, max(0, size // 2 - 2048), max(0, size - 4096)}):
      f.seek(offset)
      h.update(f.read(4096))
  return [size, h.hexdigest()[:16]]


def checkpoint_fingerprint(source: str, path: str) -> str | None:
  """A fingerprint of the teacher checkpoint at `path` computed from its files (no loading), or None
  (a random teacher, or a path this machine cannot list)."""
  if source not in ("hf", "workdir") or not path or "://" in path or not os.path.isdir(path):
    return None
  root = path
  if source == "workdir":
    from ddk_jax import checkpointing
    step = checkpointing.latest_good_step(path)
    if step is None:
      return None
    root = os.path.join(checkpointing.checkpoint_dir(path), str(step), "state")
  files = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      if source == "hf" and not (name.endswith(".safetensors") or name == "config.json"):
        continue
      full = os.path.join(dirpath, name)
      files[os.path.relpath(full, root)] = _file_samples(full)
  return _sha(files) if files else None


def teacher_identity(cfg: Any) -> dict:
  """What decides the teacher's outputs, from the config (and its checkpoint files): compared when a
  cache is read, so that a cache of another teacher is refused."""
  t = cfg.teacher
  model = {k: v for k, v in t.model.to_dict().items() if k not in _RUN_ONLY_MODEL_KEYS}
  out = {"source": str(t.source), "path": str(t.path), "model": json.loads(json.dumps(model, default=str)),
         "checkpoint": checkpoint_fingerprint(str(t.source), str(t.path))}
  if t.source == "random":
    out["seed"] = int(cfg.seed) + 1  # the trainer initialises a random teacher from seed + 1
  return out


def _data_identity(cfg: Any, data_manifest: dict) -> dict:
  prepared = {k: v for k, v in data_manifest.items() if k != "tokenizer"}
  return {"prepared": _sha(prepared), "seq_len": int(cfg.data.seq_len), "seed": int(cfg.data.seed),
          "shuffle": bool(cfg.data.shuffle), "domains": [str(d["name"]) for d in cfg.data.domains]}


def cache_identity(cfg: Any, tokenizer: Any, data_manifest: dict, process_count: int) -> dict:
  """Everything the cached values depend on except how many rows are cached."""
  return {"format_version": FORMAT_VERSION, "teacher": teacher_identity(cfg),
          "tokenizer": {"hash": tokenizer.hash, "ids": int(tokenizer.max_id) + 1},
          "data": _data_identity(cfg, data_manifest), "process_count": int(process_count),
          "top_k": int(cfg.teacher.cache_top_k), "dtype": str(cfg.teacher.cache_dtype)}


def identity_differences(cached: dict, current: dict, *, seed: int | None = None) -> list[str]:
  """What differs between the identity a cache was made with and the current one, each as
  `what: cache X, this config Y`. The teacher's source and path may differ (a run reading the cache
  says source='cache'); its model keys, its seed (a random teacher; `seed`: the run's config seed)
  and, when its checkpoint is on this machine (`current["teacher"]["checkpoint"]`), the checkpoint's
  files may not."""
  out = []

  def cmp(what: str, a: Any, b: Any) -> None:
    if a != b:
      out.append(f"{what}: cache {a!r}, this config {b!r}")

  ct, rt = cached["teacher"], current["teacher"]
  for key in sorted(set(ct["model"]) | set(rt["model"])):
    cmp(f"teacher.model.{key}", ct["model"].get(key), rt["model"].get(key))
  if "seed" in ct:
    run_seed = seed if seed is not None else rt.get("seed", ct["seed"]) - 1
    cmp("seed (a random teacher is initialised from seed + 1)", ct["seed"] - 1, run_seed)
  if ct.get("checkpoint") and rt.get("checkpoint") and ct["checkpoint"] != rt["checkpoint"]:
    out.append(f"teacher.path={rt['path']!r}: the checkpoint there is not the one the cache was made from "
               f"({ct['path']!r})")
  if cached["tokenizer"]["hash"] != current["tokenizer"]["hash"]:
    out.append(f"the tokenizer (data.tokenizer): cache hash {cached['tokenizer']['hash'][:12]}, this config "
               f"{current['tokenizer']['hash'][:12]}")
  cd, rd = cached["data"], current["data"]
  cmp("data.seq_len", cd["seq_len"], rd["seq_len"])
  cmp("data.seed", cd["seed"], rd["seed"])
  cmp("data.shuffle", cd["shuffle"], rd["shuffle"])
  cmp("data.domains (names, in order)", cd["domains"], rd["domains"])
  if cd["prepared"] != rd["prepared"] and cd["domains"] == rd["domains"]:
    out.append("the prepared data (data.domains' sources or data.prepared_dir's manifest.json) differs from "
               "the data the cache was made from")
  cmp("the number of processes (each host's row stream depends on it)", cached["process_count"],
      current["process_count"])
  cmp("teacher.cache_top_k", cached["top_k"], current["top_k"])
  cmp("teacher.cache_dtype", cached["dtype"], current["dtype"])
  return out


# ---------------------------------------------------------------------- the teacher's top-k


def topk_fn(teacher_cfg: Any, k: int, valid_vocab: int, chunk_size: int = 0) -> Callable:
  """`f(params, batch) -> {ids, logp, tail, target}` for a batch of packed rows ([B, S] arrays):
  the teacher's top-k ids and log-probabilities (temperature 1, over the first `valid_vocab` ids),
  the log-mass of the other ids and the log-probability of each target, computed over chunks of the
  sequence so that no [B, S, V] logits are held."""
  import jax
  import jax.numpy as jnp
  from ddk_jax import chunked_loss, model as model_lib
  from ddk_jax.losses import logits_f32

  def fn(params, batch):
    hidden = model_lib.apply_hidden(params, teacher_cfg, batch["inputs"], batch["positions"], batch["segment_ids"])
    head = model_lib.head_weight(params, teacher_cfg)[:, :valid_vocab]
    b, s, _ = hidden.shape
    c = max(1, min(s, (chunk_size or chunked_loss.default_chunk_size(valid_vocab)) // b))
    n = -(-s // c)
    pad = n * c - s
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, -1).swapaxes(0, 1)
    tg = jnp.pad(batch["targets"], ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)

    def chunk(x):
      hc, tc = x
      z = logits_f32(hc, head)
      m = jnp.max(z, axis=-1, keepdims=True)
      logp = z - (m + jnp.log(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True)))
      vals, ids = jax.lax.top_k(logp, k)
      bi, ci = jnp.arange(b)[:, None, None], jnp.arange(c)[None, :, None]
      rest = jnp.zeros(logp.shape, jnp.bool_).at[bi, ci, ids].set(True)
      rest = jnp.where(rest, _MASKED, logp)
      mr = jnp.max(rest, axis=-1, keepdims=True)
      tail = (mr + jnp.log(jnp.sum(jnp.exp(rest - mr), axis=-1, keepdims=True)))[..., 0]
      hit = jax.lax.broadcasted_iota(jnp.int32, logp.shape, 2) == tc[..., None]
      target = jnp.sum(jnp.where(hit, logp, 0.0), axis=-1)
      return ids, vals, tail, target

    outs = jax.lax.map(chunk, (h, tg))
    ids, logp, tail, target = (o.swapaxes(0, 1).reshape((b, n * c) + o.shape[3:])[:, :s] for o in outs)
    return {"ids": ids, "logp": logp, "tail": tail, "target": target}
  return fn


def _params_fingerprint(params: Any) -> str:
  """A fingerprint of the teacher's parameters (per leaf: shape, dtype, sum and sum of squares)."""
  import jax
  import jax.numpy as jnp
  stats = jax.jit(lambda p: jax.tree.map(lambda x: jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                                              jnp.sum(jnp.square(x.astype(jnp.float32)))]), p))(params)
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(stats))[0]
  shapes = [(tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(params)]
  return _sha([(jax.tree_util.keystr(p), s, [float(f"{v:.6e}") for v in np.asarray(x)])
               for (p, x), s in zip(leaves, shapes)])[:32]


# ---------------------------------------------------------------------------------- writing


def _agree_flags(flags: list[bool]) -> list[bool]:
  """Per item, whether it is done on every host (a barrier on several hosts)."""
  import jax
  if jax.process_count() == 1:
    return flags
  from jax.experimental import multihost_utils
  got = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32))).reshape(jax.process_count(), -1)
  return [bool(x) for x in np.all(got > 0, axis=0)]


def _marker_ok(base: str, marker: dict | None, fingerprint: str, rows: int) -> bool:
  if not marker or marker.get("fingerprint") != fingerprint or marker.get("rows") != rows:
    return False
  path = base + ".array_record"
  return os.path.exists(path) and os.path.getsize(path) == marker.get("bytes")


def _remove_my_temp_files(directory: str) -> None:
  mine = f".tmp-{socket.gethostname()}-"
  for name in os.listdir(directory):
    if mine in name:
      try:
        os.remove(os.path.join(directory, name))
      except FileNotFoundError:
        pass


def _resolve_config(cfg: Any, workdir: str | None) -> Any:
  """The config as a training run resolves it: a relative `workdir` teacher path inside `workdir` (the
  teacher is pre-trained there first when the config asks for it), the tokenizer of an HF student, the
  demo corpus built."""
  from ddk_jax import bootstrap
  cfg = copy.deepcopy(cfg)
  if not cfg.data.tokenizer and cfg.student.source == "hf":
    cfg.data.tokenizer = cfg.student.path  # as the trainer does: HF checkpoints ship their tokenizer
  t = cfg.teacher
  if t.source == "workdir" and t.path and not os.path.isabs(t.path) and "://" not in t.path and not workdir:
    raise TeacherCacheError(f"teacher.path={t.path!r} is relative to the run's workdir (teacher.source='workdir'): "
                            "pass --workdir=<the run directory it lives in>, as for python -m ddk_jax.main.")
  only_teacher = copy.deepcopy(cfg)
  only_teacher.mode = "kd"
  only_teacher.student.source, only_teacher.student.path, only_teacher.student.pretrain_steps = "random", "", 0
  resolved, status = bootstrap.prepare_models(only_teacher, workdir or os.getcwd())
  if status != "ready":
    raise TeacherCacheError("the teacher's pre-training was stopped (SIGTERM); rerun the same command to resume it.")
  cfg.teacher.path = resolved.teacher.path
  return cfg


def _student_vocab_size(cfg: Any) -> int:
  """The student's vocabulary size: the teacher is scored on it, as the trainer does."""
  from ddk_jax import config_validation
  s = cfg.student
  if s.source == "hf" and s.path:
    from ddk_jax import hf
    return int(hf.validate_checkpoint_dir(s.path).vocab_size)
  return int(config_validation.model_config(cfg, "student").vocab_size)


def build_cache(cfg: Any, *, workdir: str | None = None, progress: bool = True,
                log: Callable[[str], None] | None = print) -> dict:
  """Writes (or completes) the teacher cache of `cfg` in `cfg.teacher.cache_dir`; returns its manifest.

  `cfg` is a run's config whose teacher is the model to cache (source random, hf or workdir; a relative
  workdir path lives in `workdir`). Idempotent: finished shards are kept, missing rows and validation
  losses are added, a finished cache returns at once. Every host of a multi-host run calls it and
  writes its own rows; the teacher forward runs on the run's mesh.
  """
  import jax
  from tqdm import tqdm
  from ddk_jax import data as data_lib, run_setup, settings as settings_lib, sharding, train_step as ts, validation

  settings = settings_lib.Settings.from_config(cfg, jax.device_count())
  if cfg.teacher.source == "cache":
    raise TeacherCacheError("teacher.source='cache' reads a teacher cache; to write one, give the teacher itself: "
                            "teacher.source=random, hf or workdir (e.g. the config without "
                            "--config.teacher.source=cache).")
  if not settings.uses_teacher:
    raise TeacherCacheError("mode='cpt' trains without a teacher; there is nothing to cache (use a mode with a "
                            "teacher, e.g. --config.mode=kd).")
  tc = settings.teacher_cache
  cache_dir = tc.cache_dir
  if not cache_dir:
    raise TeacherCacheError("teacher.cache_dir is empty: pass --config.teacher.cache_dir=DIR (a local directory).")
  if "://" in cache_dir:
    raise TeacherCacheError(f"teacher.cache_dir={cache_dir}: the cache is written and read on a local disk; use a "
                            "local directory or a bucket mounted with gcsfuse.")
  cache_dir = os.path.abspath(cache_dir)
  started = time.time()
  cfg = _resolve_config(cfg, workdir)
  pi, pc = jax.process_index(), jax.process_count()
  is_main = pi == 0
  tokenizer = data_lib.load_tokenizer_from_config(cfg.data)
  data_manifest = data_lib.ensure_prepared(cfg.data, progress=is_main)
  names = data_lib.domain_names(cfg.data)
  valid_vocab = int(tokenizer.max_id) + 1
  if tc.top_k > valid_vocab:
    raise TeacherCacheError(f"teacher.cache_top_k={tc.top_k} is more than the tokenizer's {valid_vocab} ids; use at "
                            f"most {valid_vocab}.")
  identity = cache_identity(cfg, tokenizer, data_manifest, pc)
  fingerprint = _sha(identity)
  os.makedirs(cache_dir, exist_ok=True)
  layout_path = os.path.join(cache_dir, LAYOUT)
  layout_info = _read_json(layout_path)
  if layout_info is not None and layout_info.get("fingerprint") != fingerprint:
    diff = identity_differences(layout_info["identity"], identity)
    raise TeacherCacheError(f"teacher.cache_dir={cache_dir} holds a cache made for another setup ("
                            f"{'; '.join(diff) or 'another format or settings'}). Use a fresh teacher.cache_dir, or "
                            "delete that directory.")
  record = RecordLayout(seq_len=settings.seq_len, top_k=tc.top_k,
                        id_dtype="uint16" if valid_vocab <= 2**16 else "uint32", dtype=tc.dtype)
  if layout_info is None:
    layout_info = {"fingerprint": fingerprint, "identity": identity,
                   "rows_per_shard": tc.rows_per_shard or max(1, _SHARD_BYTES // record.nbytes)}
    write_json_atomic(layout_path, layout_info)  # identical on every host
  per_shard = int(layout_info["rows_per_shard"])
  old = _read_json(os.path.join(cache_dir, MANIFEST))
  old = old if old and old.get("fingerprint") == fingerprint else None
  total = max(rows_per_domain(settings.steps, settings.global_batch_size, pc, tc.domain_share),
              int(old["rows_per_domain"]) if old else 0)
  config_dict = run_setup.resolved_config_dict(cfg)
  eval_rows = sorted({settings.ddk.eval_max_rows, 0})
  keys = {m: validation.rows_key(config_dict["data"], num_processes=pc, eval_max_rows=m,
                                 eval_batch_size=settings.ddk.eval_batch_size) for m in eval_rows}
  losses = dict(old["validation"]) if old else {}
  missing_keys = [m for m, key in keys.items() if key not in losses]
  shards = _shard_rows(total, per_shard)
  done = [[_marker_ok(_shard_base(cache_dir, n, pi, pc, k), _read_json(_shard_base(cache_dir, n, pi, pc, k) + ".json"),
                      fingerprint, rows) for k, rows in enumerate(shards)] for n in names]
  done = np.asarray(_agree_flags([x for d in done for x in d]), bool).reshape(len(names), len(shards))
  if old and old["rows_per_domain"] == total and done.all() and not missing_keys:
    if log:
      log(f"[teacher_cache] {cache_dir} is complete ({total} rows per domain and process, k={tc.top_k}).")
    return old

  # ---- the teacher, on the run's mesh ----
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh.rules)
  teacher_cfg, params = run_setup._load_model(cfg, "teacher", mesh, rules, settings.seed + 1)
  if teacher_cfg.vocab_size < valid_vocab:
    raise TeacherCacheError(f"the teacher's vocab_size={teacher_cfg.vocab_size} does not cover the tokenizer's "
                            f"{valid_vocab} ids; the teacher must share the run's tokenizer.")
  t_sh = ts.params_shardings(teacher_cfg, mesh, rules)
  in_sh = {k: sharding.batch_sharding(mesh, rules, 2) for k in ("inputs", "targets", "segment_ids", "positions")}
  out_sh = {"ids": sharding.batch_sharding(mesh, rules, 3), "logp": sharding.batch_sharding(mesh, rules, 3),
            "tail": sharding.batch_sharding(mesh, rules, 2), "target": sharding.batch_sharding(mesh, rules, 2)}
  fn = topk_fn(teacher_cfg, tc.top_k, valid_vocab, settings.loss.chunk_size)

  def forward(p, batch):
    with sharding.activation_sharding(mesh, rules):
      out = fn(p, batch)
    vt = _np_dtype(record.dtype)
    return {"ids": out["ids"].astype(record.id_dtype), "logp": out["logp"].astype(vt),
            "tail": out["tail"].astype(vt), "target": out["target"].astype(vt)}

  forward = jax.jit(forward, in_shardings=(t_sh, in_sh), out_shardings=out_sh)
  micro = max(1, settings.global_batch_size // (pc * settings.grad_accum))

  def to_host(x):
    if pc == 1:
      return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        x, mesh, sharding.batch_sharding(mesh, rules, x.ndim).spec))

  def run_rows(rows: list[dict]) -> list[bytes]:
    out = []
    for i in range(0, len(rows), micro):
      part = rows[i:i + micro]
      pad = [{k: np.zeros_like(v) for k, v in part[0].items()}] * (micro - len(part))
      host = {k: np.stack([r[k] for r in part + pad]).astype(np.int32) for k in in_sh}
      got = {k: to_host(v) for k, v in forward(params, sharding.host_batch_to_global(host, mesh, rules)).items()}
      out += [record.encode(row_crc(r), got["ids"][j], got["logp"][j], got["tail"][j], got["target"][j])
              for j, r in enumerate(part)]
    return out

  bar = tqdm(total=total * len(names), unit="row", desc="teacher cache", disable=not (progress and is_main),
             file=sys.stderr, leave=False)
  try:
    for d, spec in enumerate(data_lib.domain_specs(cfg.data)):
      bar.set_postfix_str(spec.name)
      _write_domain(spec, data_manifest, cfg, shards, done[d], cache_dir=cache_dir, fingerprint=fingerprint,
                    run_rows=run_rows, micro=micro, pi=pi, pc=pc, progress=bar.update)
  finally:
    bar.close()

  # ---- the teacher's validation losses, as the trainer measures them ----
  if missing_keys:
    opts = ts.StepOptions(num_domains=len(names), mode="cpt", grad_accum=settings.grad_accum,
                          loss=ts.LossSpec.from_settings(settings.loss, steps=settings.steps, valid_vocab=valid_vocab))
    eval_vocab = min(_student_vocab_size(cfg), teacher_cfg.vocab_size)
    eval_teacher = ts.jit_eval_step(ts.make_eval_step(teacher_cfg, opts, vocab_size=eval_vocab), t_sh, mesh, rules)
    for m in missing_keys:
      batches = data_lib.build_validation(cfg.data, batch_size=settings.ddk.eval_batch_size // pc,
                                          manifest=data_manifest, tokenizer=tokenizer, max_rows=m)
      lt, _ = validation.evaluate_domains(eval_teacher, params, batches, mesh, rules, names)
      losses[keys[m]] = {"losses": [float(x) for x in lt], "eval_max_rows": m,
                         "eval_batch_size": settings.ddk.eval_batch_size,
                         "rows_per_domain": run_setup.validation_rows(batches, names)}
      if log and is_main:
        log(f"[teacher_cache] teacher validation CE (eval_max_rows={m}): "
            f"{dict(zip(names, np.round(lt, 4).tolist()))}")
  manifest = {
      "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "identity": identity,
      "rows_per_domain": total, "rows_per_shard": per_shard,
      "coverage": {"steps": settings.steps, "global_batch_size": settings.global_batch_size,
                   "domain_share": tc.domain_share},
      "record": dataclasses.asdict(record), "record_bytes": record.nbytes,
      "teacher_model": teacher_cfg.to_dict(), "teacher_params": _params_fingerprint(params),
      "teacher_vocab_size": int(teacher_cfg.vocab_size), "platform": jax.default_backend(),
      "validation": losses, "domains": names,
  }
  _agree_flags([True])  # every host has written its rows
  write_json_atomic(os.path.join(cache_dir, MANIFEST), manifest)  # identical on every host
  if log and is_main:
    log(f"[teacher_cache] done: {os.path.join(cache_dir, MANIFEST)} ({len(names)} domains x {total} rows per process, "
        f"k={tc.top_k}, {record.dtype}, {time.time() - started:.1f} s)")
  return manifest


def _write_domain(spec: Any, data_manifest: dict, cfg: Any, shards: list[int], done: np.ndarray, *, cache_dir: str,
                  fingerprint: str, run_rows: Callable, micro: int, pi: int, pc: int,
                  progress: Callable[[int], Any]) -> None:
  """The shards of one domain on this host: rows of its packed stream, in order; finished ones are skipped
  (the stream is repositioned from the state stored in the previous shard's marker)."""
  from array_record.python import array_record_module
  from ddk_jax.data import pipeline

  out_dir = os.path.dirname(_shard_base(cache_dir, spec.name, pi, pc, 0))
  os.makedirs(out_dir, exist_ok=True)
  _remove_my_temp_files(out_dir)
  rows_ds = pipeline.domain_rows(
      cfg.data.prepared_dir, data_manifest, spec.name, domain_id=spec.domain_id, split="train",
      seq_len=int(cfg.data.seq_len), process_index=pi, process_count=pc, seed=int(cfg.data.seed),
      shuffle=bool(cfg.data.shuffle), keyed=True)
  it, at, state = None, -1, None  # the iterator is positioned after shard `at`; `state`: the stream after it
  for k, n in enumerate(shards):
    base = _shard_base(cache_dir, spec.name, pi, pc, k)
    if done[k]:
      state = _read_json(base + ".json")["next_state"]
      progress(n)
      continue
    if it is None:
      it = iter(rows_ds)
    if at != k - 1:
      it.set_state(state)
    rows = [next(it) for _ in range(n)]
    first = int(rows[0][pipeline.CACHE_ROW])
    assert first == sum(shards[:k]), (spec.name, k, first)
    tmp = base + ".array_record" + tmp_tag()
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
      for i in range(0, n, micro * 8):
        for rec in run_rows(rows[i:i + micro * 8]):
          writer.write(rec)
        progress(min(micro * 8, n - i))
    finally:
      writer.close()
    os.replace(tmp, base + ".array_record")
    state = it.get_state()
    write_json_atomic(base + ".json", {"fingerprint": fingerprint, "rows": n, "first_row": first,
                                 "bytes": os.path.getsize(base + ".array_record"), "next_state": state})
    at = k


# ---------------------------------------------------------------------------------- reading


class TeacherCache:
  """A finished teacher cache, read by one process of a training run.

  `row_extras(domain_id, row_index, row)` gives the cached teacher of one packed row (the batch keys of
  `train_step.CACHE_KEYS` but `cache_row`); `validation_losses(rows_key)` the teacher's per-domain
  validation CE measured when the cache was made.
  """

  def __init__(self, cache_dir: str, manifest: dict, process_index: int, process_count: int):
    self.cache_dir = cache_dir
    self.manifest = manifest
    self.layout = RecordLayout(**manifest["record"])
    self.rows = int(manifest["rows_per_domain"])
    self.per_shard = int(manifest["rows_per_shard"])
    self.names = list(manifest["domains"])
    self._pi, self._pc = process_index, process_count
    self._readers: dict[tuple[int, int], Any] = {}
    self._check_files()

  @property
  def teacher_vocab_size(self) -> int:
    return int(self.manifest["teacher_vocab_size"])

  def shard_path(self, domain: int, k: int) -> str:
    return _shard_base(self.cache_dir, self.names[domain], self._pi, self._pc, k) + ".array_record"

  def _check_files(self) -> None:
    fix = "rerun python -m ddk_jax.teacher_cache with this config: it rewrites what is missing or damaged."
    for d in range(len(self.names)):
      for k, n in enumerate(_shard_rows(self.rows, self.per_shard)):
        path = self.shard_path(d, k)
        marker = _read_json(path[:-len(".array_record")] + ".json")
        if not os.path.exists(path) or marker is None:
          raise TeacherCacheError(f"teacher cache shard {path} (or its .json marker) is missing; {fix}")
        if marker.get("fingerprint") != self.manifest["fingerprint"] or marker.get("rows") != n:
          raise TeacherCacheError(f"teacher cache shard {path} belongs to another cache (its marker does not match "
                                  f"{os.path.join(self.cache_dir, MANIFEST)}); {fix}")
        size = os.path.getsize(path)
        if size != marker.get("bytes"):
          raise TeacherCacheError(f"teacher cache shard {path} is truncated or damaged ({size} bytes, its marker "
                                  f"says {marker.get('bytes')}); {fix}")

  def _reader(self, domain: int, k: int):
    key = (domain, k)
    if key not in self._readers:
      from array_record.python import array_record_module
      self._readers[key] = array_record_module.ArrayRecordReader(self.shard_path(domain, k))
    return self._readers[key]

  def read(self, domain: int, row_index: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(crc, ids [S, k], logp [S, k], tail [S], target log-prob [S]) of one row of a domain's stream."""
    if row_index >= self.rows:
      cov = self.manifest["coverage"]
      raise TeacherCacheError(
          f"domain {self.names[domain]!r} needs row {row_index} of its stream, but the teacher cache in "
          f"{self.cache_dir} holds {self.rows} rows per domain (made for steps={cov['steps']}, global_batch_size="
          f"{cov['global_batch_size']}, teacher.cache_domain_share={cov['domain_share']}): the mixture drew more "
          "rows of this domain than that share. Extend the cache (python -m ddk_jax.teacher_cache with a larger "
          "teacher.cache_domain_share, up to 1.0) and rerun this command: the run resumes from its last checkpoint.")
    k, i = divmod(row_index, self.per_shard)
    path = self.shard_path(domain, k)
    try:
      raw = self._reader(domain, k).read([i])[0]
    except Exception as e:  # noqa: BLE001 - the reader's own errors name no file
      raise TeacherCacheError(f"teacher cache shard {path}: row {i} cannot be read ({e}); rerun "
                              "python -m ddk_jax.teacher_cache with this config to rewrite it.") from None
    if len(raw) != self.layout.nbytes:
      raise TeacherCacheError(f"teacher cache shard {path}: row {i} has {len(raw)} bytes, expected "
                              f"{self.layout.nbytes}; the file is damaged: delete it and rerun "
                              "python -m ddk_jax.teacher_cache with this config.")
    return self.layout.decode(raw)

  def row_extras(self, domain_id: int, row_index: int, row: dict) -> dict[str, np.ndarray]:
    crc, ids, logp, tail, target = self.read(domain_id, row_index)
    if crc != row_crc(row):
      raise TeacherCacheError(
          f"row {row_index} of domain {self.names[domain_id]!r} is not the row the teacher cache in "
          f"{self.cache_dir} was made from: the data pipeline yields other rows than when the cache was written "
          "(another data config, process layout or library version). Rebuild the cache with this setup.")
    return {"teacher_ids": ids, "teacher_logp": logp, "teacher_tail": tail, "teacher_target": target}

  def validation_losses(self, rows_key: str) -> np.ndarray:
    entry = self.manifest["validation"].get(rows_key)
    if entry is None:
      raise TeacherCacheError(self._rows_message())
    return np.asarray(entry["losses"], np.float64)

  def _rows_message(self) -> str:
    have = sorted({(v["eval_max_rows"], v["eval_batch_size"]) for v in self.manifest["validation"].values()})
    return (f"the teacher cache in {self.cache_dir} holds the teacher's validation losses for other validation "
            f"rows (ddk.eval_max_rows, ddk.eval_batch_size in {have}, with the data config and process count it "
            "was made with) than this run scores. Rerun python -m ddk_jax.teacher_cache with this run's config: it "
            "adds them without recomputing the cached rows.")

  def check_validation_rows(self, *rows_keys: str) -> None:
    if any(k not in self.manifest["validation"] for k in rows_keys):
      raise TeacherCacheError(self._rows_message())


def open_cache(cache_dir: str, *, process_index: int = 0, process_count: int = 1) -> TeacherCache:
  """A finished cache (its manifest and this process's shards checked), without comparing it with a config."""
  path = os.path.join(cache_dir, MANIFEST)
  manifest = _read_json(path)
  if manifest is None:
    raise TeacherCacheError(f"no finished teacher cache in {cache_dir} ({MANIFEST} is missing); write it first: "
                            "python -m ddk_jax.teacher_cache --config=<the run's config with its teacher>.")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise TeacherCacheError(f"{path} has format_version {manifest.get('format_version')}, this code reads "
                            f"{FORMAT_VERSION}; rebuild the cache into a fresh teacher.cache_dir.")
  if manifest["identity"]["process_count"] != process_count:
    raise TeacherCacheError(f"the teacher cache in {cache_dir} was made for {manifest['identity']['process_count']} "
                            f"processes, this run has {process_count} (each host's rows depend on it); rebuild it "
                            "with this run's process count.")
  return TeacherCache(cache_dir, manifest, process_index, process_count)


def open_for_run(cfg: Any, settings: Any, tokenizer: Any, data_manifest: dict, *, student_vocab_size: int,
                 workdir: str | None = None) -> TeacherCache:
  """The cache a run with teacher.source='cache' reads, after checking that it was made for this run's
  teacher, tokenizer, data, seq_len and process layout and covers its steps (TeacherCacheError naming
  what differs). `workdir`: the run's, where a relative teacher.path of a `workdir` teacher lives."""
  import jax
  tc = settings.teacher_cache
  cache_dir = os.path.abspath(tc.cache_dir)
  cache = open_cache(cache_dir, process_index=jax.process_index(), process_count=jax.process_count())
  current = cache_identity(cfg, tokenizer, data_manifest, jax.process_count())
  made = cache.manifest["identity"]["teacher"]
  path = str(cfg.teacher.path)
  if made["source"] == "workdir" and path and not os.path.isabs(path) and "://" not in path and workdir:
    path = os.path.join(workdir, path)
  current["teacher"]["checkpoint"] = checkpoint_fingerprint(made["source"], path)  # when it is on this machine
  diff = identity_differences(cache.manifest["identity"], current, seed=int(cfg.seed))
  if diff:
    raise TeacherCacheError(
        f"the teacher cache in {cache_dir} was made for another setup: {'; '.join(diff)}. Train with the config "
        "it was made with, or write a cache for this one (python -m ddk_jax.teacher_cache) into a fresh "
        "teacher.cache_dir.")
  if current["teacher"]["checkpoint"] is None and cache.manifest["identity"]["teacher"].get("checkpoint"):
    _log.info("teacher cache: the teacher checkpoint it was made from (%s) is not on this machine; trusting the "
              "cache's manifest for it.", cache.manifest["identity"]["teacher"]["path"])
  need = rows_per_domain(settings.steps, settings.global_batch_size, jax.process_count(), tc.domain_share)
  if cache.rows < need:
    cov = cache.manifest["coverage"]
    raise TeacherCacheError(
        f"the teacher cache in {cache_dir} holds {cache.rows} rows per domain (made for steps={cov['steps']}, "
        f"global_batch_size={cov['global_batch_size']}); this run may need {need} (steps={settings.steps}, "
        f"global_batch_size={settings.global_batch_size}, teacher.cache_domain_share={tc.domain_share}). Extend it: "
        "rerun python -m ddk_jax.teacher_cache with this config (it appends the missing rows).")
  if cache.teacher_vocab_size < student_vocab_size:
    raise TeacherCacheError(
        f"the cached teacher's vocab_size={cache.teacher_vocab_size} < student vocab_size={student_vocab_size}: logit "
        "KD needs one shared tokenizer whose ids both models cover.")
  _log.info("teacher from the cache %s: k=%d (%s), %d rows per domain and process; the teacher is not loaded",
            cache_dir, cache.layout.top_k, cache.layout.dtype, cache.rows)
  loss = settings.loss
  if cache.layout.top_k < int(current["tokenizer"]["ids"]) and (
      loss.temperature != 1.0 or loss.temperature_schedule != "constant"):
    _log.warning("loss.temperature != 1 with a top-%d teacher cache: the teacher's tail (every id past its top %d) "
                 "is tempered as one bucket, which misstates the tempered teacher when the tail holds much mass; "
                 "see docs/teacher_cache.md (temperature).", cache.layout.top_k, cache.layout.top_k)
  return cache


# -------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> None:
  """`python -m ddk_jax.teacher_cache --config=FILE [--workdir=DIR]`: writes the config's teacher cache."""
  from absl import flags
  from ddk_jax import cli
  cfg = cli.require_config(argv, flags.FLAGS.config, "the run's experiment file, whose teacher is cached "
                           "(docs/teacher_cache.md)")
  cli.setup_logging()
  from ddk_jax import multihost
  multihost.initialize_or_exit()
  from ddk_jax.config_validation import ConfigError
  from ddk_jax.data.prepare import PrepareError
  try:
    build_cache(cfg, workdir=flags.FLAGS.workdir, progress=True)
  except (TeacherCacheError, ConfigError, TrainingError, PrepareError, ValueError, OSError) as e:
    cli.fail(str(e), prog="ddk_jax.teacher_cache")


if __name__ == "__main__":
  from absl import flags as _flags
  from ml_collections import config_flags
  from ddk_jax import cli as _cli
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (configs/*.py) whose teacher is cached; teacher.cache_dir says where. "
      "Override any key with --config.<key>=<value> (docs/config.md).", lock_config=True)
  _flags.DEFINE_string("workdir", None, "The run directory a relative teacher.path (source 'workdir') lives in.")
  _cli.run(main, prog="ddk_jax.teacher_cache")
