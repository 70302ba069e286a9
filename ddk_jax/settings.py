"""The run's settings, resolved and validated once from the experiment config.

The training loop and its set-up read typed fields (`settings.ddk.interval`) instead of
casting ConfigDict values; `Settings.from_config` is the one place a config is validated.
The config itself still travels to the pieces that own a section (data, models, mesh,
optimizer) and is saved, resolved, in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ddk_jax import config_validation, ddk


@dataclasses.dataclass(frozen=True)
class DDKSettings:
  interval: int  # K: steps between weight updates
  alpha: float
  floor: float | dict  # a number for every domain, or {domain: number} over all domains
  update_at_start: bool
  eval_batch_size: int  # global rows per validation batch
  eval_max_rows: int  # rows per domain the controller scores (0: all)
  cap: float | dict = 1.0  # like floor; 1: no cap
  discrepancy: str = "ratio"  # ratio (lS / lT, the paper) | excess (lS - lT)
  softmax_temperature: float = 1.0
  signal: str = "validation"  # validation (the paper) | train (the training batches of the interval)
  signal_ema: float = 1.0  # weight of the newest interval in the running train-signal losses

  def controller_options(self) -> dict:
    """The MixtureController arguments these settings fix."""
    return {"alpha": self.alpha, "floor": self.floor, "cap": self.cap, "discrepancy": self.discrepancy,
            "softmax_temperature": self.softmax_temperature, "signal": self.signal, "signal_ema": self.signal_ema}


@dataclasses.dataclass(frozen=True)
class LossSettings:
  gamma: float
  temperature: float
  impl: str
  chunk_size: int
  divergence: str = "forward_kl"
  jsd_beta: float = 0.5
  skew_alpha: float = 0.1
  akl_mu: float = 0.5
  gamma_schedule: str = "constant"  # constant | linear | cosine, from gamma at step 0 to gamma_end at steps
  gamma_end: float | None = None
  temperature_schedule: str = "constant"
  temperature_end: float | None = None


def _optional_float(value: Any) -> float | None:
  return None if value is None else float(value)


@dataclasses.dataclass(frozen=True)
class TeacherCacheSettings:
  """The teacher.cache_* keys (docs/teacher_cache.md)."""

  cache_dir: str
  top_k: int
  dtype: str
  domain_share: float
  rows_per_shard: int


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  every: int
  keep: int
  keep_period: int
  async_save: bool


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
  every: int
  tensorboard: bool
  progress_bar: bool


@dataclasses.dataclass(frozen=True)
class Settings:
  mode: str
  seed: int
  steps: int
  global_batch_size: int
  seq_len: int
  grad_accum: int
  max_consecutive_skips: int
  cosine_schedule: bool
  eval_every: int
  ddk: DDKSettings
  loss: LossSettings
  checkpoint: CheckpointSettings
  logging: LoggingSettings
  teacher_source: str = "random"  # random | hf | workdir | cache
  teacher_cache: TeacherCacheSettings | None = None

  @property
  def teacher_from_cache(self) -> bool:
    """The KD term reads a top-k teacher cache; the teacher itself is never loaded."""
    return self.uses_teacher and self.teacher_source == "cache"

  @property
  def uses_teacher(self) -> bool:
    return ddk.uses_teacher(self.mode)

  @property
  def tokens_per_step(self) -> int:
    return self.global_batch_size * self.seq_len

  @classmethod
  def from_config(cls, cfg: Any, num_devices: int) -> Settings:
    """Validates `cfg` (ConfigError naming the key and the fix) and resolves it."""
    config_validation.validate_config(cfg, num_devices)
    return cls(
        mode=str(cfg.mode), seed=int(cfg.seed), steps=int(cfg.steps),
        global_batch_size=int(cfg.global_batch_size), seq_len=int(cfg.data.seq_len),
        grad_accum=int(cfg.optimizer.grad_accum), max_consecutive_skips=int(cfg.optimizer.max_consecutive_skips),
        cosine_schedule=cfg.optimizer.schedule == "cosine", eval_every=int(cfg.eval.every),
        ddk=DDKSettings(interval=int(cfg.ddk.interval), alpha=float(cfg.ddk.alpha),
                        floor=config_validation.ddk_bound(cfg, "floor"),
                        update_at_start=bool(cfg.ddk.update_at_start), eval_batch_size=int(cfg.ddk.eval_batch_size),
                        eval_max_rows=int(cfg.ddk.eval_max_rows), cap=config_validation.ddk_bound(cfg, "cap"),
                        discrepancy=str(cfg.ddk.discrepancy), softmax_temperature=float(cfg.ddk.softmax_temperature),
                        signal=str(cfg.ddk.signal), signal_ema=float(cfg.ddk.signal_ema)),
        loss=LossSettings(gamma=float(cfg.loss.gamma), temperature=float(cfg.loss.temperature), impl=str(cfg.loss.impl),
                          chunk_size=int(cfg.loss.chunk_size), divergence=str(cfg.loss.divergence),
                          jsd_beta=float(cfg.loss.jsd_beta), skew_alpha=float(cfg.loss.skew_alpha),
                          akl_mu=float(cfg.loss.akl_mu), gamma_schedule=str(cfg.loss.gamma_schedule),
                          gamma_end=_optional_float(cfg.loss.gamma_end),
                          temperature_schedule=str(cfg.loss.temperature_schedule),
                          temperature_end=_optional_float(cfg.loss.temperature_end)),
        checkpoint=CheckpointSettings(every=int(cfg.checkpoint.every), keep=int(cfg.checkpoint.keep),
                                      keep_period=int(cfg.checkpoint.keep_period),
                                      async_save=bool(cfg.checkpoint.async_save)),
        logging=LoggingSettings(every=int(cfg.logging.every), tensorboard=bool(cfg.logging.tensorboard),
                                progress_bar=bool(cfg.logging.progress_bar)),
        teacher_source=str(cfg.teacher.source),
        teacher_cache=TeacherCacheSettings(
            cache_dir=str(cfg.teacher.cache_dir), top_k=int(cfg.teacher.cache_top_k),
            dtype=str(cfg.teacher.cache_dtype), domain_share=float(cfg.teacher.cache_domain_share),
            rows_per_shard=int(cfg.teacher.cache_rows_per_shard)),
    )
