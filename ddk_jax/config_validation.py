"""Start-up checks of a resolved experiment config.

Everything that can be known before touching a device or a file is checked here, so a
bad value fails in the first second with a message that names the key and the fix,
not an hour into a run.
"""

from __future__ import annotations

import math
from typing import Any

from ddk_jax import sharding
from ddk_jax.ddk import MODES
from ddk_jax.model import ModelConfig
from ddk_jax.losses import DIVERGENCES
from ddk_jax.train_step import LOSS_IMPLS, SCHEDULES

MODEL_SOURCES = ("random", "hf", "workdir")


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
    if cfg[which].source not in MODEL_SOURCES:
      raise ConfigError(f"{which}.source={cfg[which].source!r}: must be one of {', '.join(MODEL_SOURCES)}.")
    if cfg[which].source in ("hf", "workdir") and not cfg[which].path:
      raise ConfigError(f"{which}.path is empty but {which}.source={cfg[which].source!r} needs it: "
                        f"pass --config.{which}.path=/path/to/checkpoint.")

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
  if float(cfg.ddk.floor) < 0 or float(cfg.ddk.floor) * max(len(cfg.data.domains), 1) > 1:
    raise ConfigError(f"ddk.floor={cfg.ddk.floor!r}: must be >= 0 and floor * number of domains <= 1.")
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
    if int(cfg[which].pretrain_steps) > 0 and cfg[which].source != "workdir":
      raise ConfigError(f"{which}.pretrain_steps={cfg[which].pretrain_steps} needs {which}.source='workdir' "
                        f"(the pre-trained model is written to and read from {which}.path).")
