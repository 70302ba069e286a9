"""The training loop: data, models, DDK updates, logging, checkpoints, report.

Order of one run:
  1. check the config; prepare data (cached); build the mesh, models and jitted steps;
  2. restore the latest checkpoint of the workdir if there is one;
  3. teacher per-domain validation CE, once (cached in the controller / checkpoint);
  4. loop: every K steps (and at step 0) evaluate the student per domain, update the
     DDK weights and hand them to the mixture; one train step per batch; log; save;
  5. final eval, checkpoint, plots and report.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddk_jax import checkpointing, config_validation, flops, reporting, sharding
from ddk_jax import model as model_lib
from ddk_jax import optim, train_step as ts
from ddk_jax.controller import MixtureController, reduce_domain_losses
from ddk_jax.model import ModelConfig

_log = logging.getLogger("ddk_jax")


class TrainingError(RuntimeError):
  """A run that cannot go on; the message says why and what to do."""


class NonFiniteError(TrainingError):
  """Too many consecutive steps had a non-finite loss or gradient (optimizer.max_consecutive_skips)."""


@dataclasses.dataclass
class Models:
  student_cfg: ModelConfig
  teacher_cfg: ModelConfig | None
  student_params: Any
  teacher_params: Any


def _run_time_overrides(section: Any) -> dict:
  """Fields of a model section that describe how to run it, not its shape."""
  keys = ("param_dtype", "compute_dtype", "remat", "scan_layers", "attention_impl")
  return {k: section.model[k] for k in keys}


def _load_model(cfg: ml_collections.ConfigDict, which: str, mesh, rules, seed: int):
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


def resolved_config_dict(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort())


class _Preemption:
  """Turns SIGTERM (what a TPU preemption sends) into a stop the loop checks after each step.

  One process: a Python SIGTERM handler sets a flag.  Several processes: JAX's preemption
  service (started by jax.distributed.initialize) catches SIGTERM on any host and agrees
  on one step at which every host stops (`reached_preemption_sync_point`), so all hosts
  save the same step; no Python handler is installed then (it would replace JAX's).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multihost = False

  def __enter__(self):
    from jax._src import distributed
    self._multihost = jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None
    if self._multihost:
      return self

    def handler(signum, frame):
      self.requested = True
      _log.warning("SIGTERM received: saving a checkpoint after the current step, then exiting.")
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. in a notebook worker): no handler
      self._previous = None
    return self

  def should_stop(self, step: int) -> bool:
    """Call after every step, with the same step on every host."""
    if self._multihost:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.requested = True
        _log.warning("preemption notice (SIGTERM) reached all hosts: saving step %d, then exiting.", step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise TrainingError(f"workdir {workdir!r} is not writable ({e.strerror}); pass --workdir= a directory "
                        "you can write to.") from None


def _check_model_sources(cfg: ml_collections.ConfigDict) -> None:
  """Fails before any work when a model the run reads from disk is not there."""
  models = ("student",) if cfg.mode == "cpt" else ("teacher", "student")
  for which in models:
    section = cfg[which]
    if section.source == "workdir" and not str(section.path).startswith("gs://"):
      if checkpointing.latest_good_step(section.path) is None:
        raise TrainingError(
            f"{which}.source='workdir' but {which}.path={section.path!r} has no committed checkpoint to take the "
            f"{which} from. Train that run first (python -m ddk_jax.main --workdir={section.path} ...), set "
            f"{which}.pretrain_steps > 0 to pre-train it there, or point {which}.path at a finished run.")
    elif section.source == "hf":
      from ddk_jax import hf
      hf.validate_checkpoint_dir(section.path)  # config.json + safetensors headers; errors name the file


def _truncate_metrics(path: str, size: int, restored_step: int | None) -> None:
  """Makes metrics.jsonl read like an uninterrupted run: rows logged after the checkpoint
  we resume from (or, with no checkpoint, by an earlier attempt) are dropped."""
  if not os.path.exists(path):
    return
  current = os.path.getsize(path)
  if current > size:
    os.truncate(path, size)
    what = f"after checkpoint step {restored_step}" if restored_step is not None else "by an attempt with no checkpoint"
    _log.info("metrics.jsonl: dropped %d bytes of rows logged %s (they are logged again).", current - size, what)
  elif current < size:
    _log.warning("metrics.jsonl is shorter (%d bytes) than when step %s was saved (%d bytes); rows before the "
                 "resume point are missing from it.", current, restored_step, size)


def evaluate(eval_fn, params, validation, mesh, rules, names) -> tuple[np.ndarray, np.ndarray]:
  """Per-domain mean validation CE (and token counts) over all hosts."""
  sums = np.zeros(len(names))
  counts = np.zeros(len(names))
  for name in names:
    for batch in validation[name]():
      s, c = eval_fn(params, sharding.host_batch_to_global(batch, mesh, rules))
      # The eval step's outputs are global sums over the global batch (replicated).
      sums += np.asarray(jax.device_get(s), np.float64)
      counts += np.asarray(jax.device_get(c), np.float64)
  return reduce_domain_losses(sums, counts, names), counts


def train(cfg: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns a summary dict.

  `summary["status"]` is "done", or "preempted" after SIGTERM (a checkpoint of the last
  step was saved; the same call resumes).  Raises TrainingError (config, inputs, resume
  mismatch), NonFiniteError (too many non-finite steps; the last good checkpoint is kept)
  or checkpointing.CheckpointError (a save failed; earlier checkpoints are kept).
  """
  with _Preemption() as preemption:
    return _train(cfg, workdir, allow_config_change, preemption)


def _train(cfg: ml_collections.ConfigDict, workdir: str, allow_config_change: bool, preemption: _Preemption) -> dict:
  from ddk_jax import data as data_lib

  t_start = time.time()
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  config_validation.validate_config(cfg, jax.device_count())
  _check_workdir(workdir)
  if int(cfg.optimizer.max_consecutive_skips) < 0:
    raise TrainingError(f"optimizer.max_consecutive_skips={cfg.optimizer.max_consecutive_skips}: must be >= 0 "
                        "(0: never stop on non-finite steps).")
  _check_model_sources(cfg)
  mode = cfg.mode

  # ---- data -------------------------------------------------------------------------
  if cfg.data.get("demo_corpus_dir"):
    data_lib.ensure_demo_corpus(cfg.data.demo_corpus_dir, log=_log.info)
  tokenizer = data_lib.load_tokenizer_from_config(cfg.data)
  manifest = data_lib.ensure_prepared(cfg.data, progress=is_main)
  names = data_lib.domain_names(cfg.data)
  num_domains = len(names)

  # ---- mesh and models ----------------------------------------------------------------
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh.rules)
  _log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
  student_cfg, student_params = _load_model(cfg, "student", mesh, rules, cfg.seed)
  data_lib.check_vocab_fits(tokenizer, student_cfg.vocab_size, "student")
  teacher_cfg = teacher_params = None
  if mode != "cpt":
    teacher_cfg, teacher_params = _load_model(cfg, "teacher", mesh, rules, cfg.seed + 1)
    if teacher_cfg.vocab_size < student_cfg.vocab_size:
      raise TrainingError(
          f"teacher vocab_size={teacher_cfg.vocab_size} < student vocab_size={student_cfg.vocab_size}: logit KD "
          "needs one shared tokenizer whose ids both models cover; choose a teacher/student pair with the same "
          "tokenizer.")
  _log.info("student %.1fM params, teacher %s", student_cfg.num_params() / 1e6,
            f"{teacher_cfg.num_params() / 1e6:.1f}M params" if teacher_cfg else "none (cpt)")

  # ---- steps ----------------------------------------------------------------------------
  opts = ts.StepOptions(num_domains=num_domains, mode=mode, gamma=float(cfg.loss.gamma),
                        temperature=float(cfg.loss.temperature), grad_accum=int(cfg.optimizer.grad_accum),
                        loss_impl=cfg.loss.impl, loss_chunk_size=int(cfg.loss.chunk_size))
  optimizer = optim.make_optimizer(cfg.optimizer, int(cfg.steps))
  s_sh = ts.params_shardings(student_cfg, mesh, rules)
  t_sh = ts.params_shardings(teacher_cfg, mesh, rules) if teacher_cfg else None
  state_sh = ts.state_shardings(s_sh, optimizer, student_params, mesh)
  state = jax.jit(lambda p: ts.init_train_state(p, optimizer), out_shardings=state_sh)(student_params)
  del student_params
  train_step = ts.jit_train_step(ts.make_train_step(student_cfg, teacher_cfg, optimizer, opts), state_sh, t_sh,
                                 mesh, rules)
  eval_opts = dataclasses.replace(opts, mode="cpt")
  eval_student = ts.jit_eval_step(ts.make_eval_step(student_cfg, eval_opts), s_sh, mesh, rules)
  eval_teacher = ts.jit_eval_step(ts.make_eval_step(teacher_cfg, eval_opts), t_sh, mesh, rules) if teacher_cfg else None

  per_process_batch = int(cfg.global_batch_size) // jax.process_count()
  data_iter = data_lib.build_train_iterator(cfg.data, manifest=manifest, tokenizer=tokenizer)
  eval_rows = int(cfg.ddk.eval_batch_size) // jax.process_count()
  validation = data_lib.build_validation(cfg.data, batch_size=eval_rows, manifest=manifest, tokenizer=tokenizer,
                                         max_rows=int(cfg.ddk.eval_max_rows))

  controller = MixtureController(names, mode, alpha=float(cfg.ddk.alpha), floor=float(cfg.ddk.floor),
                                 initial_weights=None if mode == "ddk_equal_sampling" else data_lib.initial_weights(cfg.data))

  # ---- resume -----------------------------------------------------------------------------
  # Uncommitted step directories are moved aside here; a step that does not restore falls
  # back to the previous one (checkpointing.RunCheckpoints).
  ckpt = checkpointing.RunCheckpoints(workdir, cfg.checkpoint)
  config_dict = resolved_config_dict(cfg)
  runtime = {"num_processes": jax.process_count(), "num_devices": jax.device_count(),
             "mesh_shape": {k: int(v) for k, v in mesh.shape.items()}}
  total_steps = int(cfg.steps)
  start_step = 0
  # Kept in checkpoints, so the figures of a resumed run cover all its attempts. Wall time
  # and validation time are split as the report shows them: the controller's own
  # validation (teacher once, student at every update) vs the final and eval.every ones.
  log_state: dict[str, Any] = {"eval_seconds": 0.0, "controller_eval_seconds": 0.0, "wall_seconds": 0.0,
                               "train_seconds": 0.0, "initial_student_losses": None,
                               "final_student_losses": None, "metrics_bytes": 0, "consecutive_skips": 0}

  def check_resume(meta: dict) -> bool:
    """Refuses config changes that would change the experiment; True: restore the data position."""
    changed = checkpointing.config_changes(meta["config"], config_dict)
    layout = checkpointing.runtime_changes(meta.get("runtime"), runtime)
    if (changed or layout) and not allow_config_change:
      raise TrainingError(
          f"the config differs from the one {workdir} was started with, in keys {changed + layout}; changing "
          "them mid-run would silently change the experiment. Use the original values, a new --workdir, or pass "
          "--allow_config_change to accept the change.")
    if changed or layout:
      _log.warning("resuming with changed keys %s (--allow_config_change): the run is no longer the one it "
                   "started as.", changed + layout)
    for key, (old, new) in checkpointing.resumable_changes(meta["config"], config_dict).items():
      _log.info("resuming with %s changed from %r to %r", key, old, new)
      if key == "steps" and cfg.optimizer.schedule == "cosine":
        _log.warning("steps changed from %s to %s: the cosine learning-rate schedule now decays over %s steps "
                     "(from the restored step on).", old, new, new)
    saved_processes = (meta.get("runtime") or {}).get("num_processes", jax.process_count())
    if saved_processes != jax.process_count():
      _log.warning("the checkpoint was written by %d processes, this run has %d: the data pipelines start from "
                   "the beginning of their (new) shards.", saved_processes, jax.process_count())
      return False
    return True

  try:
    found = ckpt.restore_latest(checkpointing.abstract_with_shardings(state, state_sh), data_iter, check_resume)
  except BaseException:
    ckpt.close(quiet=True)
    raise
  if found is not None:
    start_step, state, meta = found
    controller.load_state_dict(meta["controller"])
    log_state.update(meta.get("log_state", {}))
    data_iter.set_weights(controller.weights.tolist())
    _log.info("resumed from %s at step %d", ckpt.directory, start_step)
    if start_step > total_steps:
      ckpt.close(quiet=True)
      raise TrainingError(f"{workdir} holds a checkpoint of step {start_step}, beyond steps={total_steps}; pass "
                          f"--config.steps >= {start_step} to continue it, or use a new --workdir.")
    if start_step < total_steps:
      log_state["final_student_losses"] = None  # continuing a finished run: it gets a new final eval
  if is_main:
    _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), int(log_state["metrics_bytes"]),
                      start_step if found is not None else None)

  writer = reporting.MetricsWriter(workdir, enabled=is_main, tensorboard=bool(cfg.logging.tensorboard))
  flops_per_step = flops.kd_step_flops(student_cfg, teacher_cfg, int(cfg.global_batch_size) * int(cfg.data.seq_len),
                                       int(cfg.data.seq_len))
  peak, peak_source = flops.peak_flops_per_device(student_cfg.compute_dtype)
  peak_total = peak * jax.device_count()
  _log.info("MFU denominator: %.1f TFLOP/s over %d devices (%s)", peak_total / 1e12, jax.device_count(), peak_source)

  eval_batches = sum(v.num_batches for v in validation.values())

  def run_eval(step: int, params, for_controller: bool = False) -> np.ndarray:
    drain()  # train rows of earlier steps first: metrics.jsonl is in step order however the run was cut
    t = time.time()
    losses, _ = evaluate(eval_student, params, validation, mesh, rules, names)
    seconds = time.time() - t
    log_state["eval_seconds"] += seconds
    if for_controller:
      log_state["controller_eval_seconds"] += seconds
    _log.info("student validation at step %d: %d batches in %.1f s", step, eval_batches, seconds)
    writer.write(step, {f"val/{n}/ce": float(l) for n, l in zip(names, losses)}
                 | {f"val/{n}/ppl": float(np.exp(l)) for n, l in zip(names, losses)}, kind="eval")
    return losses

  # The teacher is frozen: its validation losses are computed once and kept in the controller.
  if mode != "cpt" and controller.teacher_losses is None:
    t = time.time()
    lt, _ = evaluate(eval_teacher, teacher_params, validation, mesh, rules, names)
    log_state["eval_seconds"] += time.time() - t
    log_state["controller_eval_seconds"] += time.time() - t
    _log.info("teacher validation: %d batches in %.1f s (once; cached in checkpoints)", eval_batches, time.time() - t)
    controller.set_teacher_losses(lt)
    writer.write(start_step, {f"val_teacher/{n}/ce": float(l) for n, l in zip(names, lt)}, kind="teacher_eval")
    _log.info("teacher validation CE: %s", dict(zip(names, np.round(lt, 4).tolist())))

  wall_before = float(log_state.get("wall_seconds", 0.0))  # earlier attempts of a resumed run
  wall_seconds = lambda: wall_before + time.time() - t_start

  def save(step: int, force: bool = False) -> None:
    log_state["wall_seconds"] = wall_seconds()
    if is_main:  # metrics.jsonl is cut back to this length when the run resumes from this step
      log_state["metrics_bytes"] = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
    meta = {"controller": controller.state_dict(), "config": config_dict, "log_state": log_state,
            "runtime": runtime, "step": step,
            "rng": {"seed": int(cfg.seed), "data_seed": int(cfg.data.seed),
                    "note": "the train step draws no random numbers (no dropout); params are initialised from "
                            "seed; the mixture's draws are keyed by (data.seed, process, draw counter) and the "
                            "counter is in the data item"}}
    ckpt.save(step, state, data_iter, meta, force=force)

  def ddk_update(step: int) -> None:
    ls = run_eval(step, state["params"], for_controller=True)
    if log_state["initial_student_losses"] is None:
      log_state["initial_student_losses"] = [float(x) for x in ls]
    weights = controller.update(step, ls)
    data_iter.set_weights(weights.tolist())
    writer.write(step, {f"weights/{n}": float(w) for n, w in zip(names, weights)}, kind="weights")
    if is_main:
      _log.info("DDK update at step %d\n%s", step, controller.format_table())

  interval = int(cfg.ddk.interval)
  max_skips = int(cfg.optimizer.max_consecutive_skips)
  needs_update_at = lambda step: (
      step % interval == 0 and (step > 0 or bool(cfg.ddk.update_at_start))
      and (not controller.history or controller.history[-1]["step"] < step))

  progress = reporting.Progress(total_steps, start_step, enabled=is_main and bool(cfg.logging.progress_bar))
  pending: list = []  # metrics of dispatched steps, read one step late so the host never stalls the device
  tokens_since = 0
  t_window = time.time()
  skipped_total = int(jax.device_get(state["skipped_steps"]))
  step = start_step

  def drain() -> None:
    """Reads the metrics of every dispatched step: logs them, counts non-finite steps."""
    nonlocal tokens_since, t_window, skipped_total
    while pending:
      s, m, doms = pending.pop(0)
      m = jax.device_get(m)
      tokens_since += float(m["tokens"])
      if bool(m["finite"]):
        log_state["consecutive_skips"] = 0
      else:
        skipped_total += 1
        log_state["consecutive_skips"] += 1
        _log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all; batch domains "
                     "%s)", s + 1, log_state["consecutive_skips"], skipped_total,
                     {n: int(c) for n, c in zip(names, doms) if c})
      if (s + 1) % int(cfg.logging.every) == 0 or s + 1 == total_steps or not bool(m["finite"]):
        elapsed = time.time() - t_window
        tok_s = tokens_since / max(elapsed, 1e-9)
        mfu = flops_per_step / int(cfg.global_batch_size) / int(cfg.data.seq_len) * tok_s / peak_total
        row = {"loss": float(m["loss"]), "ce": float(m["ce"]), "kl": float(m["kl"]),
               "grad_norm": float(m["grad_norm"]), "tokens_per_s": tok_s, "mfu": mfu,
               "skipped_steps": skipped_total}
        writer.write(s + 1, row, kind="train")
        progress.update(s + 1, loss=row["loss"], tok_s=tok_s, mfu=mfu)
        tokens_since, t_window = 0, time.time()
      if max_skips and log_state["consecutive_skips"] >= max_skips:
        last_good = ckpt.latest_step()
        raise NonFiniteError(
            f"steps {s + 2 - log_state['consecutive_skips']}..{s + 1}: {log_state['consecutive_skips']} consecutive "
            f"steps had a non-finite loss or gradient (optimizer.max_consecutive_skips={max_skips}); stopping. "
            f"No checkpoint was saved after the first of them: the last good checkpoint is "
            f"{'step ' + str(last_good) if last_good is not None else 'none (the run never saved one)'} in "
            f"{ckpt.directory}. Likely causes: a learning rate too high (optimizer.learning_rate), overflow in "
            "bfloat16 (try compute_dtype float32), or broken data in the domains logged above. Fix the cause and "
            "rerun: the run resumes from that checkpoint (pass --allow_config_change if you changed the config).")

  try:
    while step < total_steps:
      if needs_update_at(step):
        ddk_update(step)
      batch = data_iter.next_batch(per_process_batch)
      domains_in_batch = np.bincount(batch["domain_id"], minlength=num_domains)
      t = time.time()
      state, metrics = train_step(state, teacher_params, sharding.host_batch_to_global(batch, mesh, rules))
      pending.append((step, metrics, domains_in_batch))
      step += 1
      if len(pending) > 1 or step == total_steps:
        drain()
      log_state["train_seconds"] += time.time() - t
      if cfg.eval.every and step % int(cfg.eval.every) == 0 and step % interval:
        run_eval(step, state["params"])
      if step % int(cfg.checkpoint.every) == 0 and step < total_steps:
        drain()  # the checkpoint and metrics.jsonl then agree on what happened up to `step`
        if log_state["consecutive_skips"]:
          _log.warning("not saving the checkpoint of step %d: the last %d steps were non-finite.", step,
                       log_state["consecutive_skips"])
        else:
          save(step)
      if preemption.should_stop(step):
        drain()
        if ckpt.latest_step() != step:
          save(step, force=True)
        ckpt.wait()
        _log.warning("checkpoint of step %d saved after SIGTERM; exiting. Rerun the same command to resume.", step)
        progress.close()
        writer.close()
        ckpt.close()
        return {"status": "preempted", "step": step}
    drain()
    progress.close()

    if log_state.get("final_student_losses") is None:
      final_losses = run_eval(total_steps, state["params"])
      log_state["final_student_losses"] = [float(x) for x in final_losses]
      if ckpt.latest_step() != total_steps:
        save(total_steps, force=True)
    else:
      _log.info("%s already finished at step %d; writing its report again.", workdir, total_steps)
    ckpt.wait()
  except BaseException:
    progress.close()
    writer.close()
    ckpt.close(quiet=True)  # lets an in-flight save of a good step finish
    raise
  summary = {
      "status": "done", "step": total_steps, "mode": mode, "domains": names,
      "student_initial": log_state["initial_student_losses"],
      "student_final": log_state["final_student_losses"],
      "teacher": None if controller.teacher_losses is None else [float(x) for x in controller.teacher_losses],
      "weights": controller.weights.tolist(),
      "skipped_steps": skipped_total,
      "eval_seconds": log_state["eval_seconds"],
      "controller_eval_seconds": log_state.get("controller_eval_seconds", 0.0),
      "wall_seconds": wall_seconds(),
  }
  if is_main:
    reporting.write_report(workdir, summary, controller.history, cfg)
  writer.close()
  ckpt.close()
  return summary
