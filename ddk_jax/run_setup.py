"""Everything a training run is built from, before its first step.

`setup()` prepares the data, builds the mesh, loads the models, compiles the steps, creates
the controller and the checkpoint manager, and restores the latest checkpoint. It returns a
`Run` (what stays fixed for the run) and a `RunState` (what the loop changes and the
checkpoints keep). The loop itself is in `ddk_jax.trainer`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from ddk_jax import checkpointing, flops, reporting, resume_policy, sharding, storage, validation
from ddk_jax import optim, train_step as ts
from ddk_jax.controller import MixtureController
from ddk_jax.errors import TrainingError
from ddk_jax.model import ModelConfig
from ddk_jax.settings import Settings

_log = logging.getLogger("ddk_jax")


@dataclasses.dataclass
class LogState:
  """Figures kept in checkpoints, so the report of a resumed run covers all its attempts.

  Validation time is split as the report shows it: the controller's own validation
  (teacher once, student at every update) vs the final and `eval.every` ones.
  """

  eval_seconds: float = 0.0
  controller_eval_seconds: float = 0.0
  wall_seconds: float = 0.0
  train_seconds: float = 0.0
  initial_student_losses: list[float] | None = None
  final_student_losses: list[float] | None = None
  metrics_bytes: int = 0  # length of metrics.jsonl at the checkpoint (cut back to it on resume)
  consecutive_skips: int = 0
  teacher_rows: str | None = None  # validation.rows_key the cached teacher losses were measured on
  # The controller's train signal (ddk.signal; trainer._signal_accumulate): per-domain sums of the
  # training batches' student CE, teacher CE and target tokens since the last DDK update (global
  # over hosts), the step that window starts at, and the running per-domain losses of the last
  # update (None: a domain never measured). Teacher modes keep them whatever the signal.
  signal_start: int | None = None
  signal_student_sum: list[float] | None = None
  signal_teacher_sum: list[float] | None = None
  signal_tokens: list[float] | None = None
  signal_student_ce: list[float | None] | None = None
  signal_teacher_ce: list[float | None] | None = None
  # With ddk.eval_max_rows > 0 the controller scores a subset; the report's numbers use the
  # whole validation split: the student at step 0 (scored once, before training) and the
  # teacher (scored once, at the end) on it.  Uncapped runs leave these None: the
  # controller's rows are then the whole split.
  whole_initial_student_losses: list[float] | None = None
  whole_teacher_losses: list[float] | None = None
  whole_teacher_rows: str | None = None  # validation.rows_key of the whole split they were measured on
  downstream: dict | None = None  # the last eval.tasks results: {"step", "tasks", "limit", "results", "seconds"}

  @classmethod
  def from_dict(cls, d: dict) -> LogState:
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Run:
  """The fixed parts of a run."""

  settings: Settings
  workdir: str
  is_main: bool
  names: list[str]
  mesh: Any
  rules: Any
  student_cfg: ModelConfig
  teacher_cfg: ModelConfig | None
  teacher_params: Any
  train_step: Any  # jitted (state, teacher_params, batch) -> (state, metrics)
  eval_student: Any  # jitted (params, batch) -> per-domain (CE sum, count)
  eval_teacher: Any
  data_iter: Any  # the DDK mixture over the per-domain pipelines
  validation: dict  # domain -> ValidationBatches: the rows the controller scores (ddk.eval_max_rows)
  rows_key: str  # which validation rows the controller scores (validation.rows_key)
  whole_validation: dict  # the whole validation split, for the final evaluation (`validation` when the same rows)
  whole_rows_key: str
  rows_per_domain: list[int]  # rows of `validation` per domain, over all hosts
  whole_rows_per_domain: list[int]  # rows of `whole_validation` per domain, over all hosts
  per_process_batch: int
  controller: MixtureController
  ckpt: checkpointing.RunCheckpoints
  writer: reporting.MetricsWriter
  progress: reporting.Progress
  config_dict: dict
  runtime: dict
  flops_per_token: float
  peak_flops: float  # all devices
  teacher_cache: Any = None  # teacher_cache.TeacherCache with teacher.source='cache' (no teacher loaded)
  task_lm: Any = None  # the downstream adapter (eval.tasks), built at its first use

  @property
  def capped(self) -> bool:
    """Whether the controller scores fewer rows than the whole validation split (ddk.eval_max_rows)."""
    return self.whole_validation is not self.validation

  def global_batch(self, batch: dict) -> dict:
    return sharding.host_batch_to_global(batch, self.mesh, self.rules)

  def close(self, *, quiet: bool = False) -> None:
    self.progress.close()
    try:
      self.writer.close()
    except OSError as e:  # quiet: closing after another error, which is the one to report
      if not quiet:
        self.ckpt.close(quiet=True)
        raise
      _log.error("closing metrics.jsonl / TensorBoard failed: %s", e)
    self.ckpt.close(quiet=quiet)


@dataclasses.dataclass
class RunState:
  """What the loop changes: the train state, the step, the log figures, the metric window."""

  step: int
  train_state: dict
  log: LogState
  skipped_total: int
  started_at: float
  wall_before: float  # wall time of earlier attempts of a resumed run
  pending: list = dataclasses.field(default_factory=list)  # (step, metrics, rows per domain), read a step late
  window_tokens: float = 0.0
  window_rows: np.ndarray | None = None
  window_start: float = dataclasses.field(default_factory=time.time)

  def wall_seconds(self) -> float:
    return self.wall_before + time.time() - self.started_at


def resolved_config_dict(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort())


def validation_rows(batches: dict, names: list[str]) -> list[int]:
  """Rows (of seq_len tokens) per domain in `build_validation`'s batches, over all hosts."""
  local = np.array([len(batches[n].rows) for n in names], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(names)).sum(axis=0)
  return [int(x) for x in local]


def _check_workdir(workdir: str) -> None:
  try:
    storage.check_writable(workdir)
  except OSError as e:
    raise TrainingError(f"workdir {workdir!r} is not writable ({e.strerror or e}); pass --workdir= a directory "
                        "or gs:// bucket path you can write to.") from None


def _run_time_overrides(section: Any) -> dict:
  """Fields of a model section that describe how to run it, not its shape."""
  keys = ("param_dtype", "compute_dtype", "remat", "scan_layers", "attention_impl")
  return {k: section.model[k] for k in keys}


def _load_model(cfg: ml_collections.ConfigDict, which: str, mesh, rules, seed: int):
  from ddk_jax import config_validation
  section = cfg[which]
  if section.source == "random":
    mcfg = config_validation.model_config(cfg, which)
    sh = ts.params_shardings(mcfg, mesh, rules)
    return mcfg, ts.init_params_sharded(mcfg, jax.random.key(seed), sh)
  if section.source == "hf":
    from ddk_jax import hf
    params, mcfg = hf.load_hf_checkpoint(section.path, mesh=mesh, rules=rules,
                                         config_overrides=_run_time_overrides(section))
    return mcfg, params
  if section.source == "workdir":
    return checkpointing.restore_student_params(section.path, mesh, rules, overrides=_run_time_overrides(section))
  raise TrainingError(f"{which}.source={section.source!r} is not supported")


def _teacher_cache(cfg, settings: Settings, tokenizer, manifest: dict, student_cfg: ModelConfig, workdir: str):
  """With teacher.source='cache' (docs/teacher_cache.md): the checked teacher cache the KD term and the
  mixture's rows read (the teacher is never loaded); else None."""
  if not settings.teacher_from_cache:
    return None
  from ddk_jax import teacher_cache
  return teacher_cache.open_for_run(cfg, settings, tokenizer, manifest, student_vocab_size=student_cfg.vocab_size,
                                    workdir=workdir)


def setup(cfg: ml_collections.ConfigDict, settings: Settings, workdir: str, *,
          allow_config_change: bool) -> tuple[Run, RunState]:
  from ddk_jax import data as data_lib

  started_at = time.time()
  workdir = storage.resolve(workdir)  # absolute locally; gs://... kept as it is
  is_main = jax.process_index() == 0
  _check_workdir(workdir)

  # ---- data ----
  tokenizer = data_lib.load_tokenizer_from_config(cfg.data)
  manifest = data_lib.ensure_prepared(cfg.data, progress=is_main)
  names = data_lib.domain_names(cfg.data)

  # ---- mesh and models ----
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh.rules)
  _log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
  student_cfg, student_params = _load_model(cfg, "student", mesh, rules, settings.seed)
  data_lib.check_vocab_fits(tokenizer, student_cfg.vocab_size, "student")
  teacher_cfg = teacher_params = None
  cache = _teacher_cache(cfg, settings, tokenizer, manifest, student_cfg, workdir)  # teacher.source='cache'
  if settings.uses_teacher and cache is None:
    teacher_cfg, teacher_params = _load_model(cfg, "teacher", mesh, rules, settings.seed + 1)
    if teacher_cfg.vocab_size < student_cfg.vocab_size:
      raise TrainingError(
          f"teacher vocab_size={teacher_cfg.vocab_size} < student vocab_size={student_cfg.vocab_size}: logit KD "
          "needs one shared tokenizer whose ids both models cover; choose a teacher/student pair with the same "
          "tokenizer.")
  _log.info("student %.1fM params, teacher %s", student_cfg.num_params() / 1e6,
            f"{teacher_cfg.num_params() / 1e6:.1f}M params" if teacher_cfg else "cached" if cache else "none (cpt)")

  # ---- steps ----
  # The loss covers the tokenizer's ids only: rows an embedding is padded with get no mass.
  opts = ts.StepOptions(num_domains=len(names), mode=settings.mode, grad_accum=settings.grad_accum,
                        loss=ts.LossSpec.from_settings(settings.loss, steps=settings.steps,
                                                       valid_vocab=tokenizer.max_id + 1),
                        teacher_cache=cache is not None)
  optimizer = optim.make_optimizer(cfg.optimizer, settings.steps)
  s_sh = ts.params_shardings(student_cfg, mesh, rules)
  t_sh = ts.params_shardings(teacher_cfg, mesh, rules) if teacher_cfg else None
  state_sh = ts.state_shardings(s_sh, optimizer, student_params, mesh)
  train_state = jax.jit(lambda p: ts.init_train_state(p, optimizer), out_shardings=state_sh)(student_params)
  del student_params
  train_step = ts.jit_train_step(ts.make_train_step(student_cfg, teacher_cfg, optimizer, opts), state_sh, t_sh,
                                 mesh, rules, teacher_cache=cache is not None)
  eval_opts = dataclasses.replace(opts, mode="cpt")
  eval_student = ts.jit_eval_step(ts.make_eval_step(student_cfg, eval_opts), s_sh, mesh, rules)
  # The teacher is scored on the student's vocabulary, as in the KD term: padded rows of a
  # larger teacher embedding never receive probability mass.
  eval_teacher = (ts.jit_eval_step(ts.make_eval_step(teacher_cfg, eval_opts, vocab_size=student_cfg.vocab_size),
                                   t_sh, mesh, rules) if teacher_cfg else None)

  data_iter = data_lib.build_train_iterator(cfg.data, manifest=manifest, tokenizer=tokenizer,
                                            row_extras=cache.row_extras if cache else None)
  # The final evaluation (and the report) uses the whole validation split; the controller
  # scores the first ddk.eval_max_rows rows per domain of it when that is fewer.
  eval_rows, eval_batch = settings.ddk.eval_max_rows, settings.ddk.eval_batch_size // jax.process_count()
  whole_batches = data_lib.build_validation(cfg.data, batch_size=eval_batch, manifest=manifest, tokenizer=tokenizer)
  whole_rows_per_domain = validation_rows(whole_batches, names)
  batches, rows_per_domain = whole_batches, whole_rows_per_domain
  if eval_rows and max(whole_rows_per_domain) > eval_rows:
    batches = data_lib.build_validation(cfg.data, batch_size=eval_batch, manifest=manifest, tokenizer=tokenizer,
                                        max_rows=eval_rows)
    rows_per_domain = validation_rows(batches, names)
  config_dict = resolved_config_dict(cfg)
  rows_key, whole_rows_key = (
      validation.rows_key(config_dict["data"], num_processes=jax.process_count(), eval_max_rows=max_rows,
                          eval_batch_size=settings.ddk.eval_batch_size) for max_rows in (eval_rows, 0))
  if cache is not None:  # the teacher's losses on these rows were measured when the cache was made
    cache.check_validation_rows(rows_key, whole_rows_key)
  controller = MixtureController(
      names, settings.mode, **settings.ddk.controller_options(),
      initial_weights=None if settings.mode == "ddk_equal_sampling" else data_lib.initial_weights(cfg.data))

  # ---- resume ----
  # Uncommitted step directories are moved aside here; a step that does not restore falls
  # back to the previous one (checkpointing.RunCheckpoints).
  ckpt = checkpointing.RunCheckpoints(workdir, settings.checkpoint)
  runtime = {"num_processes": jax.process_count(), "num_devices": jax.device_count(),
             "mesh_shape": {k: int(v) for k, v in mesh.shape.items()}}
  log = LogState()
  start_step = 0

  def check_meta(meta: dict) -> bool:
    return resume_policy.check_resume(meta, config_dict, runtime, workdir=workdir,
                                      allow_config_change=allow_config_change,
                                      cosine_schedule=settings.cosine_schedule).restore_data

  try:
    found = ckpt.restore_latest(checkpointing.abstract_with_shardings(train_state, state_sh), data_iter, check_meta)
    if found is not None:
      start_step, train_state, meta = found
      resume_policy.check_resume_step(start_step, settings.steps, workdir)
      controller.load_state_dict(meta["controller"])
      log = LogState.from_dict(meta.get("log_state", {}))
      if log.teacher_rows is None and controller.teacher_losses is not None:
        log.teacher_rows = rows_key  # written before the rows were recorded: measured on these rows
      _log.info("resumed from %s at step %d", ckpt.directory, start_step)
      if start_step < settings.steps:
        log.final_student_losses = None  # continuing a finished run: it gets a new final eval
  except BaseException:
    ckpt.close(quiet=True)
    raise
  # Sample with the controller's weights from the first step on (uniform for equal
  # sampling, floored for the static modes), whether or not an update runs at step 0.
  data_iter.set_weights(controller.weights.tolist())

  writer = reporting.MetricsWriter(workdir, enabled=is_main, tensorboard=settings.logging.tensorboard)
  if is_main:
    writer.truncate(log.metrics_bytes, start_step if found is not None else None)
  peak, peak_source = flops.peak_flops_per_device(student_cfg.compute_dtype)
  _log.info("MFU denominator: %.1f TFLOP/s over %d devices (%s)", peak * jax.device_count() / 1e12,
            jax.device_count(), peak_source)
  run = Run(
      settings=settings, workdir=workdir, is_main=is_main, names=names, mesh=mesh, rules=rules,
      student_cfg=student_cfg, teacher_cfg=teacher_cfg, teacher_params=teacher_params, train_step=train_step,
      eval_student=eval_student, eval_teacher=eval_teacher, data_iter=data_iter, validation=batches,
      rows_key=rows_key, whole_validation=whole_batches, whole_rows_key=whole_rows_key,
      rows_per_domain=rows_per_domain, whole_rows_per_domain=whole_rows_per_domain,
      per_process_batch=settings.global_batch_size // jax.process_count(),
      controller=controller, ckpt=ckpt, writer=writer,
      progress=reporting.Progress(settings.steps, start_step, enabled=is_main and settings.logging.progress_bar),
      config_dict=config_dict, runtime=runtime,
      flops_per_token=flops.kd_step_flops(student_cfg, teacher_cfg, settings.tokens_per_step,
                                          settings.seq_len) / settings.tokens_per_step,
      peak_flops=peak * jax.device_count(), teacher_cache=cache)
  state = RunState(step=start_step, train_state=train_state, log=log,
                   skipped_total=int(jax.device_get(train_state["skipped_steps"])), started_at=started_at,
                   wall_before=float(log.wall_seconds), window_rows=np.zeros(len(names), np.int64))
  return run, state
