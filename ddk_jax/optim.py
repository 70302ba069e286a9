"""Optimizer: AdamW with warmup + cosine/constant schedule, clipping, no decay on norms/biases."""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "constant")
# Params that get no weight decay: RMSNorm scales and attention biases.
_NO_DECAY_SUFFIXES = ("norm", "bq", "bk", "bv")


def learning_rate_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
  peak = float(opt_cfg.learning_rate)
  warmup = int(opt_cfg.warmup_steps)
  if opt_cfg.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])
  if opt_cfg.schedule == "cosine":
    decay_steps = max(total_steps - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, max(warmup, 1), warmup + decay_steps, end_value=peak * float(opt_cfg.min_lr_ratio))
  raise ValueError(f"optimizer.schedule={opt_cfg.schedule!r} is not one of {SCHEDULES}")


def decay_mask(params: Any) -> Any:
  def wants_decay(path, _):
    return not str(path[-1].key).endswith(_NO_DECAY_SUFFIXES)
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(opt_cfg: Any, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if float(opt_cfg.grad_clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip_norm)))
  parts.append(optax.adamw(
      learning_rate_schedule(opt_cfg, total_steps),
      b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
      weight_decay=float(opt_cfg.weight_decay), mask=decay_mask))
  return optax.chain(*parts)
