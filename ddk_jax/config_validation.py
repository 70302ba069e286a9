"""Start-up checks of a resolved experiment config.

Everything that can be known before touching a device or a file is checked here, so a
bad value fails in the first second with a message that names the key and the fix,
not an hour into a run.
"""

from __future__ import annotations

import math
from typing import Any

from ddk_jax import ddk, sharding
from ddk_jax.ddk import MODES
from ddk_jax.model import ModelConfig
from ddk_jax.losses import CACHE_DIVERGENCES, DIVERGENCES
from ddk_jax.train_step import LOSS_IMPLS, SCHEDULES

MODEL_SOURCES = ("random", "hf", "workdir")
TEACHER_SOURCES = MODEL_SOURCES + ("cache",)  # 'cache': a top-k teacher cache (ddk_jax.teacher_cache)
CACHE_DTYPES = ("float16", "bfloat16", "float32")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def _positive_int(cfg: Any, key: str) -> None:
  value = _get(cfg, key)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ConfigError(f"{key}={value!r}: must be a positive integer.")


def _get(cfg: Any, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def model_config(cfg: Any, which: str) -> ModelConfig:
  try:
    m = ModelConfig.from_dict(cfg[which].model.to_dict())
    m.validate(prefix=f"{which}.model")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return m


def _validate_loss(loss: Any) -> None:
  """The divergence, its parameter and the gamma / temperature schedules."""
  if loss.divergence not in DIVERGENCES:
    raise ConfigError(f"loss.divergence={loss.divergence!r}: must be one of {', '.join(DIVERGENCES)}.")
  if not 0.0 < float(loss.jsd_beta) < 1.0:
    raise ConfigError(f"loss.jsd_beta={loss.jsd_beta!r}: must be in (0, 1) (0.5: the Jensen-Shannon divergence); "
                      "for the limits use loss.divergence='forward_kl' (beta -> 0) or 'reverse_kl' (beta -> 1).")
  if not 0.0 <= float(loss.skew_alpha) < 1.0:
    raise ConfigError(f"loss.skew_alpha={loss.skew_alpha!r}: must be in [0, 1) (0: the plain KL; DistiLLM uses 0.1).")
  if not 0.0 <= float(loss.akl_mu) <= 1.0:
    raise ConfigError(f"loss.akl_mu={loss.akl_mu!r}: must be in [0, 1] (the AKL paper uses 0.5).")
  for name, low, strict in (("gamma", 0.0, False), ("temperature", 0.0, True)):
    kind, end = loss[f"{name}_schedule"], loss[f"{name}_end"]
    if kind not in SCHEDULES:
      raise ConfigError(f"loss.{name}_schedule={kind!r}: must be one of {', '.join(SCHEDULES)}.")
    if kind == "constant":
      continue
    if end is None:
      raise ConfigError(f"loss.{name}_schedule={kind!r} needs loss.{name}_end (the value at the last step); "
                        f"pass --config.loss.{name}_end=VALUE.")
    if (float(end) <= low) if strict else (float(end) < low):
      raise ConfigError(f"loss.{name}_end={end!r}: must be {'>' if strict else '>='} {low:g}.")


def _domain_names(cfg: Any) -> list[str]:
  return [str(d.get("name")) if hasattr(d, "get") else str(d) for d in (cfg.data.domains or [])]


def ddk_bound(cfg: Any, key: str) -> float | dict:
  """`ddk.floor` or `ddk.cap` resolved: a float for every domain, or {domain: float} over all
  domains (those a map leaves out: 0 for the floor, 1 for the cap). ConfigError for a value
  that is neither, a number outside [0, 1] or an unknown domain."""
  value, default = cfg.ddk[key], (0.0 if key == "floor" else 1.0)
  names = _domain_names(cfg)

  def number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
      raise ConfigError(f"{where}={v!r}: must be a number in [0, 1], or a map {{domain: number}} over the domains "
                        f"{names}.")
    return float(v)

  if hasattr(value, "items"):
    unknown = [k for k in value.keys() if k not in names]
    if unknown:
      raise ConfigError(f"ddk.{key}: unknown domains {unknown}; the domains are {names}.")
    given = {str(k): number(v, f"ddk.{key}.{k}") for k, v in value.items()}
    return {n: given.get(n, default) for n in names}
  return number(value, f"ddk.{key}")


def _validate_ddk(cfg: Any) -> None:
  """The ddk section's variants (discrepancy, temperature, signal) and the floor and cap."""
  d = cfg.ddk
  if d.discrepancy not in ddk.DISCREPANCIES:
    raise ConfigError(f"ddk.discrepancy={d.discrepancy!r}: must be one of {', '.join(ddk.DISCREPANCIES)} "
                      "(ratio: lS / lT, the paper; excess: lS - lT).")
  if not (math.isfinite(float(d.softmax_temperature)) and float(d.softmax_temperature) > 0):
    raise ConfigError(f"ddk.softmax_temperature={d.softmax_temperature!r}: must be > 0 (1: the paper).")
  if d.signal not in ddk.SIGNALS:
    raise ConfigError(f"ddk.signal={d.signal!r}: must be one of {', '.join(ddk.SIGNALS)} (validation: the paper; "
                      "train: the training batches' losses).")
  if not 0.0 < float(d.signal_ema) <= 1.0:
    raise ConfigError(f"ddk.signal_ema={d.signal_ema!r}: must be in (0, 1] (1: the last interval's mean alone).")
  if d.signal == "train" and not ddk.uses_teacher(cfg.mode):
    raise ConfigError("ddk.signal='train' needs the teacher's loss on the training batches, and mode=cpt has no "
                      "teacher; use ddk.signal='validation' (or a mode with a teacher).")
  names = _domain_names(cfg)
  floor, cap = ddk_bound(cfg, "floor"), ddk_bound(cfg, "cap")
  per_domain = lambda v: [v[n] for n in names] if isinstance(v, dict) else [v] * len(names)
  problem = names and ddk.check_bounds(per_domain(floor), per_domain(cap), names)  # no domains: the data check
  if problem:
    key = "ddk.floor" if "floors sum" in problem else "ddk.cap" if "caps sum" in problem else "ddk.floor / ddk.cap"
    raise ConfigError(f"{key} (floor={d.floor!r}, cap={d.cap!r}): {problem}")


def _validate_teacher_cache(cfg: Any) -> None:
  """The teacher.cache_* keys; with teacher.source='cache', the divergences a top-k cache can give."""
  t = cfg.teacher
  k = t.cache_top_k
  if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
    raise ConfigError(f"teacher.cache_top_k={k!r}: must be a positive integer (64 by default).")
  if t.cache_dtype not in CACHE_DTYPES:
    raise ConfigError(f"teacher.cache_dtype={t.cache_dtype!r}: must be one of {', '.join(CACHE_DTYPES)}.")
  if not 0.0 < float(t.cache_domain_share) <= 1.0:
    raise ConfigError(f"teacher.cache_domain_share={t.cache_domain_share!r}: must be in (0, 1] (1.0 caches enough "
                      "rows of every domain for any mixture).")
  if int(t.cache_rows_per_shard) < 0:
    raise ConfigError(f"teacher.cache_rows_per_shard={t.cache_rows_per_shard!r}: must be >= 0 (0: automatic).")
  if t.source != "cache" or cfg.mode == "cpt":
    return
  if not t.cache_dir:
    raise ConfigError("teacher.source='cache' needs teacher.cache_dir: pass --config.teacher.cache_dir=DIR, the "
                      "directory python -m ddk_jax.teacher_cache wrote.")
  if cfg.loss.divergence not in CACHE_DIVERGENCES:
    raise ConfigError(f"loss.divergence={cfg.loss.divergence!r} cannot be computed from a top-k teacher cache (it "
                      "sorts the teacher's whole distribution); with teacher.source='cache' use one of "
                      f"{', '.join(CACHE_DIVERGENCES)}, or run the teacher online.")


def validate_config(cfg: Any, num_devices: int) -> None:
  """Raises ConfigError for the first problem found."""
  if cfg.mode not in MODES:
    raise ConfigError(f"mode={cfg.mode!r}: must be one of {', '.join(MODES)}.")
  for key in ("steps", "global_batch_size", "ddk.interval", "ddk.eval_batch_size", "optimizer.grad_accum",
              "logging.every", "checkpoint.every", "checkpoint.keep", "data.seq_len"):
    _positive_int(cfg, key)
  for key in ("eval.every", "optimizer.warmup_steps", "checkpoint.keep_period", "ddk.eval_max_rows"):
    if int(_get(cfg, key)) < 0:
      raise ConfigError(f"{key}={_get(cfg, key)!r}: must be >= 0.")
  if int(cfg.optimizer.max_consecutive_skips) < 0:
    raise ConfigError(f"optimizer.max_consecutive_skips={cfg.optimizer.max_consecutive_skips}: must be >= 0 "
                      "(0: never stop on non-finite steps).")
  if not float(cfg.optimizer.learning_rate) > 0:
    raise ConfigError(f"optimizer.learning_rate={cfg.optimizer.learning_rate!r}: must be > 0.")
  if not 0.0 <= float(cfg.ddk.alpha) <= 1.0:
    raise ConfigError(f"ddk.alpha={cfg.ddk.alpha!r}: must be in [0, 1] (the paper uses 0.5).")
  if not float(cfg.loss.temperature) > 0:
    raise ConfigError(f"loss.temperature={cfg.loss.temperature!r}: must be > 0.")
  if float(cfg.loss.gamma) < 0:
    raise ConfigError(f"loss.gamma={cfg.loss.gamma!r}: must be >= 0.")
  if cfg.loss.impl not in LOSS_IMPLS:
    raise ConfigError(f"loss.impl={cfg.loss.impl!r}: must be one of {', '.join(LOSS_IMPLS)}.")
  _validate_loss(cfg.loss)
  for which in ("teacher", "student"):
    sources = TEACHER_SOURCES if which == "teacher" else MODEL_SOURCES
    if cfg[which].source not in sources:
      raise ConfigError(f"{which}.source={cfg[which].source!r}: must be one of {', '.join(sources)}.")
    if cfg[which].source in ("hf", "workdir") and not cfg[which].path:
      raise ConfigError(f"{which}.path is empty but {which}.source={cfg[which].source!r} needs it: "
                        f"pass --config.{which}.path=/path/to/checkpoint.")

  _validate_teacher_cache(cfg)
  student = model_config(cfg, "student")
  if cfg.mode != "cpt":
    teacher = model_config(cfg, "teacher")
    # With HF sources the shapes come from config.json and are re-checked after loading.
    if teacher.vocab_size < student.vocab_size:
      raise ConfigError(
          f"teacher.model.vocab_size={teacher.vocab_size} < student.model.vocab_size={student.vocab_size}: "
          "logit distillation needs one shared tokenizer, and the teacher must cover the student's vocabulary "
          "(a teacher padded to a larger vocab is fine); pick a pair that shares a tokenizer, or use mode=cpt.")

  try:
    mesh_sizes = sharding.resolve_mesh_shape(cfg.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  rules = dict(sharding.rules_from_config(cfg.mesh.rules))
  batch_axes = rules.get("batch") or ()
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  dp = math.prod(mesh_sizes[a] for a in batch_axes)
  accum = int(cfg.optimizer.grad_accum)
  if cfg.global_batch_size % (dp * accum):
    raise ConfigError(
        f"global_batch_size={cfg.global_batch_size} is not divisible by data-parallel size {dp} "
        f"(mesh {mesh_sizes}, batch over {list(batch_axes)}) x optimizer.grad_accum={accum}; "
        f"use a multiple of {dp * accum}.")
  if cfg.ddk.eval_batch_size % dp:
    raise ConfigError(f"ddk.eval_batch_size={cfg.ddk.eval_batch_size} is not divisible by the data-parallel "
                      f"size {dp}; use a multiple of {dp}.")
  _validate_ddk(cfg)
  prepared = str(cfg.data.get("prepared_dir") or "")
  if "://" in prepared:
    raise ConfigError(
        f"data.prepared_dir={prepared}: prepared shards are read with a local-disk reader, so they cannot be "
        "read from a bucket directly. Mount the bucket with gcsfuse (e.g. gcsfuse BUCKET /mnt/bucket) and set "
        "data.prepared_dir to the mounted path, or prepare to a local disk. Sources, models and the workdir "
        "may stay on gs://.")
  for which in ("teacher", "student"):
    if int(cfg[which].pretrain_steps) < 0:
      raise ConfigError(f"{which}.pretrain_steps={cfg[which].pretrain_steps!r}: must be >= 0.")
    # With source='cache' the teacher's pre-training is what the cache was made from (not redone).
    if int(cfg[which].pretrain_steps) > 0 and cfg[which].source not in ("workdir", "cache"):
      raise ConfigError(f"{which}.pretrain_steps={cfg[which].pretrain_steps} needs {which}.source='workdir' "
                        f"(the pre-trained model is written to and read from {which}.path).")
