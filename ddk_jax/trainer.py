"""The training loop: DDK updates, train steps, evaluation, logging and checkpoints.

    summary = trainer.train(cfg, workdir)     # runs or resumes the experiment in workdir

Order of one run: validate the config (`Settings`), pre-train any model the config asks for
(`bootstrap`), build everything and restore the latest checkpoint (`run_setup`), then `_loop`:
the teacher's per-domain validation CE once (cached in checkpoints); every K steps (and at
step 0) the student's, a DDK update and new mixture weights; one train step per batch;
metrics, periodic evaluation and checkpoints; finally an evaluation on the whole validation
split, downstream tasks when `eval.tasks` names some (also every `eval.tasks_every` steps), a
last checkpoint, plots and report.md.
"""

from __future__ import annotations

import logging
import time

import jax
import ml_collections
import numpy as np

from ddk_jax import bootstrap, checkpointing, ddk as ddk_lib, reporting, run_setup, validation
from ddk_jax.errors import NonFiniteError, TrainingError  # noqa: F401  (part of this module's API)
from ddk_jax.preemption import Preemption
from ddk_jax.run_setup import Run, RunState
from ddk_jax.settings import Settings

_log = logging.getLogger("ddk_jax")


def train(cfg: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns a summary dict.

  `summary["status"]` is "done", or "preempted" after SIGTERM (a checkpoint of the last
  step was saved; the same call resumes).  Raises ConfigError or TrainingError (config,
  inputs, resume mismatch), NonFiniteError (too many non-finite steps; the last good
  checkpoint is kept) or checkpointing.CheckpointError (a save failed; earlier checkpoints
  are kept).
  """
  settings = Settings.from_config(cfg, jax.device_count())  # before any work is done
  check_task_config(cfg)
  cfg, status = bootstrap.prepare_models(cfg, workdir)
  if status == "preempted":
    return {"status": "preempted"}
  with Preemption() as preemption:
    run, state = run_setup.setup(cfg, settings, workdir, allow_config_change=allow_config_change)
    try:
      summary = _loop(run, state, preemption)
    except OSError as e:  # a file of the workdir could not be written (a full disk, say)
      try:
        run.ckpt.wait()  # a save in flight that failed as well is the error to report (it names its step)
      except checkpointing.CheckpointError:
        run.close(quiet=True)
        raise
      run.close(quiet=True)
      raise run.ckpt.write_error(e) from e
    except BaseException:
      run.close(quiet=True)  # lets an in-flight save of a good step finish
      raise
    try:
      run.close()
    except OSError as e:
      raise run.ckpt.write_error(e) from e
    return summary


def _loop(run: Run, st: RunState, preemption: Preemption) -> dict:
  s = run.settings
  try:
    _score_teacher(run, st)
    _score_before(run, st)
    while st.step < s.steps:
      if _ddk_update_due(run, st):
        _ddk_update(run, st)
      batch = run.data_iter.next_batch(run.per_process_batch)
      rows = np.bincount(batch["domain_id"], minlength=len(run.names))
      t = time.time()
      st.train_state, metrics = run.train_step(st.train_state, run.teacher_params, run.global_batch(batch))
      st.pending.append((st.step, metrics, rows))
      st.step += 1
      if len(st.pending) > 1 or st.step == s.steps:
        _drain(run, st)  # reads the previous step's metrics: the host never stalls the device
      st.log.train_seconds += time.time() - t
      if s.eval_every and st.step % s.eval_every == 0 and (st.step % s.ddk.interval or s.ddk.signal == "train"):
        _score_student(run, st, st.step)
      if _tasks_due(run, st):
        _downstream(run, st, st.step)
      if st.step % s.checkpoint.every == 0 and st.step < s.steps:
        _periodic_save(run, st)
      if preemption.should_stop(st.step):
        _drain(run, st)
        if run.ckpt.latest_step() != st.step:
          _save(run, st, force=True)
        run.ckpt.wait()
        _log.warning("checkpoint of step %d saved after SIGTERM; exiting. Rerun the same command to resume.",
                     st.step)
        return {"status": "preempted", "step": st.step}
    _drain(run, st)
  finally:
    run.progress.close()
  _finish(run, st)
  return _summary(run, st)


# ---- DDK -------------------------------------------------------------------------------


def _score_teacher(run: Run, st: RunState) -> None:
  """The frozen teacher's per-domain validation CE, computed once and cached in the controller.

  Computed again only when the validation rows changed (a resume with another process
  count or data config): lS / lT compares the two models on the same rows.
  """
  if not run.settings.uses_teacher:
    return
  cached = run.controller.teacher_losses
  if cached is not None and st.log.teacher_rows == run.rows_key:
    return
  if cached is not None:
    _log.warning("the validation rows differ from those the cached teacher losses were measured on (process "
                 "count or data changed): scoring the teacher again.")
  t = time.time()
  if run.teacher_cache is not None:  # teacher.source='cache': measured on these rows when the cache was made
    lt = run.teacher_cache.validation_losses(run.rows_key)
  else:
    lt, _ = validation.evaluate_domains(run.eval_teacher, run.teacher_params, run.validation, run.mesh, run.rules,
                                        run.names)
  seconds = time.time() - t
  st.log.eval_seconds += seconds
  st.log.controller_eval_seconds += seconds
  _log.info("teacher validation: %d batches in %.1f s (once; cached in checkpoints)", _eval_batches(run), seconds)
  run.controller.set_teacher_losses(lt, force=cached is not None)
  st.log.teacher_rows = run.rows_key
  run.writer.write(st.step, {f"val_teacher/{n}/ce": float(v) for n, v in zip(run.names, lt)}, kind="teacher_eval")
  _log.info("teacher validation CE: %s", dict(zip(run.names, np.round(lt, 4).tolist())))


def _update_at_start(s) -> bool:
  """Whether the controller updates at step 0: with the validation signal, unless switched off;
  the train signal has nothing to measure before the first training step."""
  return s.ddk.update_at_start and s.ddk.signal == "validation"


def _score_before(run: Run, st: RunState) -> None:
  """The report's "before" losses at step 0, when no DDK update at step 0 measures them, and
  on the whole split (once) when the controller scores a subset of it."""
  if st.step != 0:
    return
  if st.log.initial_student_losses is None and not _update_at_start(run.settings):
    st.log.initial_student_losses = _score_student(run, st, 0).tolist()
  if run.capped and st.log.whole_initial_student_losses is None:
    st.log.whole_initial_student_losses = _score_whole_split(run, st, 0).tolist()


def _ddk_update_due(run: Run, st: RunState) -> bool:
  ddk = run.settings.ddk
  history = run.controller.history
  return (st.step % ddk.interval == 0 and (st.step > 0 or _update_at_start(run.settings))
          and (not history or history[-1]["step"] < st.step))


def _ddk_update(run: Run, st: RunState) -> None:
  teacher = None
  if run.settings.ddk.signal == "train":
    signal = _train_signal(run, st)
    if signal is None:
      return
    losses, teacher = signal
  else:
    losses = _score_student(run, st, st.step, for_controller=True)
    if st.log.initial_student_losses is None:
      st.log.initial_student_losses = [float(x) for x in losses]
  weights = run.controller.update(st.step, losses, teacher_losses=teacher)
  _signal_reset(run, st, st.step)
  run.data_iter.set_weights(weights.tolist())
  run.writer.write(st.step, {f"weights/{n}": float(w) for n, w in zip(run.names, weights)}, kind="weights")
  if run.is_main:
    _log.info("DDK update at step %d\n%s", st.step, reporting.controller_table(run.controller))


# ---- the train signal (ddk.signal, docs/ddk.md) -----------------------------------------------
#
# Every drained train step adds its per-domain (student CE, teacher CE, token) sums, global over
# hosts, to a window that each DDK update closes. The sums and the running losses live in
# LogState, so a resumed run continues the same window.


def _signal_accumulate(run: Run, st: RunState, step: int, m: dict) -> None:
  """Adds one step's per-domain sums to the window (a non-finite step adds nothing)."""
  if "domain_teacher_ce_sum" not in m:
    if run.settings.ddk.signal == "train":
      raise TrainingError("ddk.signal='train' needs the teacher's CE on the training batches, which this train "
                          "step does not report; use ddk.signal='validation'.")
    return
  log = st.log
  if log.signal_tokens is None:  # the first step of a run (or of a resume from a checkpoint without a window)
    _signal_reset(run, st, step)
  if not bool(m["finite"]):
    return
  add = lambda total, x: (np.asarray(total, np.float64) + np.asarray(x, np.float64)).tolist()
  log.signal_student_sum = add(log.signal_student_sum, m["domain_ce_sum"])
  log.signal_teacher_sum = add(log.signal_teacher_sum, m["domain_teacher_ce_sum"])
  log.signal_tokens = add(log.signal_tokens, m["domain_count"])


def _signal_reset(run: Run, st: RunState, step: int) -> None:
  """Starts a new window at `step` (at every DDK update of a run with a teacher)."""
  if not run.settings.uses_teacher:
    return
  zeros = [0.0] * len(run.names)
  st.log.signal_start = step
  st.log.signal_student_sum, st.log.signal_teacher_sum, st.log.signal_tokens = list(zeros), list(zeros), list(zeros)


def _train_signal(run: Run, st: RunState) -> tuple[np.ndarray, np.ndarray] | None:
  """(lS, lT) of the window for the controller (ddk_lib.window_signal), the running values kept
  in LogState; None (no update, a warning) when the window has no tokens."""
  _drain(run, st)
  log, n = st.log, len(run.names)
  if log.signal_tokens is None:
    _signal_reset(run, st, st.step)
  running = lambda v: np.full(n, np.nan) if v is None else np.array([np.nan if x is None else x for x in v])
  ls, lt, run_s, run_t, measured = ddk_lib.window_signal(
      log.signal_student_sum, log.signal_teacher_sum, log.signal_tokens, running(log.signal_student_ce),
      running(log.signal_teacher_ce), ema=run.settings.ddk.signal_ema)
  as_list = lambda a: [None if np.isnan(x) else float(x) for x in a]
  log.signal_student_ce, log.signal_teacher_ce = as_list(run_s), as_list(run_t)
  if ls is None:
    _log.warning("DDK update at step %d skipped: no finite training step since the last update, so the train "
                 "signal has no tokens; the weights stay as they are.", st.step)
    return None
  if not measured.all():
    _log.info("train signal at step %d: %s had no training rows yet and count as an average domain", st.step,
              [d for d, ok in zip(run.names, measured) if not ok])
  return ls, lt


def _log_signal(run: Run, st: RunState, step: int, losses: np.ndarray) -> None:
  """A metrics row of kind "signal" at a validation during training: the training batches'
  per-domain mean CEs since the last update next to the validation CEs of the same moment."""
  log, history = st.log, run.controller.history
  if log.signal_tokens is None or step >= run.settings.steps or not any(log.signal_tokens):
    return
  if log.signal_start != (history[-1]["step"] if history else 0):
    return  # the window began before the checkpoint this run resumed from kept one
  teacher = run.controller.teacher_losses
  row = {}
  for i, n in enumerate(run.names):
    tokens = log.signal_tokens[i]
    if tokens:
      row[f"train_signal/{n}/student_ce"] = log.signal_student_sum[i] / tokens
      row[f"train_signal/{n}/teacher_ce"] = log.signal_teacher_sum[i] / tokens
    row[f"train_signal/{n}/tokens"] = tokens
    row[f"val_signal/{n}/student_ce"] = float(losses[i])
    if teacher is not None:
      row[f"val_signal/{n}/teacher_ce"] = float(teacher[i])
  run.writer.write(step, row, kind="signal")


# ---- downstream tasks (eval.tasks) ---------------------------------------------------------


def check_task_config(cfg: ml_collections.ConfigDict) -> None:
  """ConfigError, before any work, for eval.tasks settings that cannot run (lm-eval missing, an
  unknown task, a negative eval.tasks_every / eval.tasks_limit)."""
  from ddk_jax import evaluate
  from ddk_jax.config_validation import ConfigError
  every = int(cfg.eval.get("tasks_every", 0))
  if every < 0:
    raise ConfigError(f"eval.tasks_every={every}: must be >= 0 (0: the tasks run only at the end).")
  try:
    evaluate.check_tasks(cfg.eval.get("tasks", ""), limit=int(cfg.eval.get("tasks_limit", 0)), flags={
        "tasks": "eval.tasks", "limit": "eval.tasks_limit"})
  except evaluate.EvaluationError as e:
    raise ConfigError(str(e)) from None


def _task_settings(run: Run) -> tuple[str, int, int]:
  """(eval.tasks, eval.tasks_every, eval.tasks_limit) of the run."""
  e = run.config_dict.get("eval", {})
  return str(e.get("tasks") or "").strip(), int(e.get("tasks_every") or 0), int(e.get("tasks_limit") or 0)


def _tasks_due(run: Run, st: RunState) -> bool:
  tasks, every, _ = _task_settings(run)
  return bool(tasks) and every > 0 and st.step % every == 0 and st.step < run.settings.steps


def _downstream(run: Run, st: RunState, step: int) -> None:
  """The eval.tasks downstream tasks on the live student: a metrics row of kind "tasks"
  (`tasks/<task>/<metric>`, TensorBoard too), the results kept in the log state (summary.json and
  report.md show the last ones).  Every process runs it (the forward is collective).  The
  adapter is built, and its forward compiled, once per run; later calls swap the params in."""
  from ddk_jax import evaluate
  tasks, _, limit = _task_settings(run)
  _drain(run, st)  # metrics.jsonl stays in step order
  params = st.train_state["params"]
  if run.task_lm is None:
    from ddk_jax import data as data_lib
    tokenizer = data_lib.load_tokenizer_from_config(run.config_dict["data"])
    run.task_lm = evaluate.task_adapter(params, run.student_cfg, tokenizer, data_seq_len=run.settings.seq_len,
                                        batch_size=run.settings.ddk.eval_batch_size, mesh=run.mesh, rules=run.rules)
  else:
    run.task_lm.update_params(params)
  results, done = evaluate.run_downstream(run.task_lm, tasks, limit=limit,
                                          corpus_dir=run.config_dict["data"].get("demo_corpus_dir"))
  seconds = (st.log.downstream or {}).get("seconds", 0.0) + done["seconds"]
  st.log.downstream = {"step": step, "tasks": tasks, "limit": limit, "results": results, "seconds": seconds}
  run.writer.write(step, {f"tasks/{t}/{k}": v for t, metrics in results.items() for k, v in metrics.items()},
                   kind="tasks")
  _log.info("downstream tasks at step %d (%.1f s): %s", step, done["seconds"], ", ".join(
      f"{t} acc {m['acc']:.4f}" for t, m in results.items() if "acc" in m) or results)


# ---- evaluation, metrics, checkpoints ------------------------------------------------------


def _eval_batches(run: Run) -> int:
  return sum(v.num_batches for v in run.validation.values())


def _score_student(run: Run, st: RunState, step: int, *, for_controller: bool = False) -> np.ndarray:
  _drain(run, st)  # train rows of earlier steps first: metrics.jsonl stays in step order
  t = time.time()
  losses, _ = validation.evaluate_domains(run.eval_student, st.train_state["params"], run.validation, run.mesh,
                                          run.rules, run.names)
  seconds = time.time() - t
  st.log.eval_seconds += seconds
  if for_controller:
    st.log.controller_eval_seconds += seconds
  _log.info("student validation at step %d: %d batches in %.1f s", step, _eval_batches(run), seconds)
  run.writer.write(step, {f"val/{n}/ce": float(v) for n, v in zip(run.names, losses)}
                   | {f"val/{n}/ppl": float(np.exp(v)) for n, v in zip(run.names, losses)}, kind="eval")
  _log_signal(run, st, step, losses)
  return losses


def _score_whole_split(run: Run, st: RunState, step: int, *, teacher: bool = False) -> np.ndarray:
  """The student's (or the teacher's) CE on the whole validation split, for a run whose controller
  scores fewer rows (ddk.eval_max_rows): logged as kind "eval_whole" ("teacher_eval_whole")."""
  _drain(run, st)
  t = time.time()
  fn, params = (run.eval_teacher, run.teacher_params) if teacher else (run.eval_student, st.train_state["params"])
  if teacher and run.teacher_cache is not None:  # teacher.source='cache': measured when the cache was made
    losses = run.teacher_cache.validation_losses(run.whole_rows_key)
  else:
    losses, _ = validation.evaluate_domains(fn, params, run.whole_validation, run.mesh, run.rules, run.names)
  seconds = time.time() - t
  st.log.eval_seconds += seconds
  who = "teacher" if teacher else "student"
  _log.info("%s validation on the whole split at step %d: %d batches in %.1f s", who, step,
            sum(v.num_batches for v in run.whole_validation.values()), seconds)
  prefix = "val_whole_teacher" if teacher else "val_whole"
  run.writer.write(step, {f"{prefix}/{n}/ce": float(v) for n, v in zip(run.names, losses)}
                   | {f"{prefix}/{n}/ppl": float(np.exp(v)) for n, v in zip(run.names, losses)},
                   kind=f"{'teacher_' if teacher else ''}eval_whole")
  return losses


def _drain(run: Run, st: RunState) -> None:
  """Reads the metrics of every dispatched step: logs them, counts non-finite steps."""
  s = run.settings
  while st.pending:
    step, m, rows = st.pending.pop(0)
    m = jax.device_get(m)
    _signal_accumulate(run, st, step, m)
    st.window_tokens += float(m["tokens"])
    st.window_rows += rows
    if bool(m["finite"]):
      st.log.consecutive_skips = 0
    else:
      st.skipped_total += 1
      st.log.consecutive_skips += 1
      _log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all; batch domains "
                   "%s)", step + 1, st.log.consecutive_skips, st.skipped_total,
                   {n: int(c) for n, c in zip(run.names, rows) if c})
    if (step + 1) % s.logging.every == 0 or step + 1 == s.steps or not bool(m["finite"]):
      tok_s = st.window_tokens / max(time.time() - st.window_start, 1e-9)
      mfu = run.flops_per_token * tok_s / run.peak_flops
      row = {"loss": float(m["loss"]), "ce": float(m["ce"]), "kl": float(m["kl"]),
             "grad_norm": float(m["grad_norm"]), "gamma": float(m["gamma"]), "temperature": float(m["temperature"]),
             "tokens_per_s": tok_s, "mfu": mfu,
             "skipped_steps": st.skipped_total}
      row |= {f"rows/{n}": int(c) for n, c in zip(run.names, st.window_rows)}  # this host's rows since the last row
      run.writer.write(step + 1, row, kind="train")
      run.progress.update(step + 1, loss=row["loss"], tok_s=tok_s, mfu=mfu)
      st.window_tokens, st.window_start = 0.0, time.time()
      st.window_rows = np.zeros_like(st.window_rows)
    if s.max_consecutive_skips and st.log.consecutive_skips >= s.max_consecutive_skips:
      raise _non_finite_error(run, st, step)


def _non_finite_error(run: Run, st: RunState, step: int) -> NonFiniteError:
  n = st.log.consecutive_skips
  last_good = run.ckpt.latest_step()
  return NonFiniteError(
      f"steps {step + 2 - n}..{step + 1}: {n} consecutive steps had a non-finite loss or gradient "
      f"(optimizer.max_consecutive_skips={run.settings.max_consecutive_skips}); stopping. No checkpoint was saved "
      "after the first of them: the last good checkpoint is "
      f"{'step ' + str(last_good) if last_good is not None else 'none (the run never saved one)'} in "
      f"{run.ckpt.directory}. Likely causes: a learning rate too high (optimizer.learning_rate), overflow in "
      "bfloat16 (try compute_dtype float32), or broken data in the domains logged above. Fix the cause and rerun: "
      "the run resumes from that checkpoint (pass --allow_config_change if you changed the config).")


def _periodic_save(run: Run, st: RunState) -> None:
  _drain(run, st)  # the checkpoint and metrics.jsonl then agree on what happened up to the step
  if st.log.consecutive_skips:
    _log.warning("not saving the checkpoint of step %d: the last %d steps were non-finite.", st.step,
                 st.log.consecutive_skips)
  else:
    _save(run, st)


def _save(run: Run, st: RunState, force: bool = False) -> None:
  st.log.wall_seconds = st.wall_seconds()
  if run.is_main:  # metrics.jsonl is cut back to this length when the run resumes from this step
    st.log.metrics_bytes = run.writer.size()
  meta = {"controller": run.controller.state_dict(), "config": run.config_dict, "log_state": st.log.to_dict(),
          "runtime": run.runtime, "step": st.step,
          "rng": {"seed": run.settings.seed, "data_seed": int(run.config_dict["data"]["seed"]),
                  "note": "the train step draws no random numbers (no dropout); params are initialised from "
                          "seed; the mixture's draws are keyed by (data.seed, process, draw counter) and the "
                          "counter is in the data item"}}
  run.ckpt.save(st.step, st.train_state, run.data_iter, meta, force=force)


def _finish(run: Run, st: RunState) -> None:
  """Final evaluation on the whole validation split and checkpoint (once: a finished run only
  rewrites its report).  When the controller scores a subset (ddk.eval_max_rows), the student is
  also scored on that subset (the `val/` curves end at the last step) and the teacher, once, on
  the whole split (the report compares both models on the same rows)."""
  steps = run.settings.steps
  if st.log.final_student_losses is None:
    final = _score_student(run, st, steps)
    if run.capped:
      final = _score_whole_split(run, st, steps)
      if run.settings.uses_teacher and st.log.whole_teacher_rows != run.whole_rows_key:
        st.log.whole_teacher_losses = _score_whole_split(run, st, steps, teacher=True).tolist()
        st.log.whole_teacher_rows = run.whole_rows_key
    st.log.final_student_losses = [float(x) for x in final]
    if _task_settings(run)[0]:
      _downstream(run, st, steps)
    if run.ckpt.latest_step() != steps:
      _save(run, st, force=True)
  else:
    _log.info("%s already finished at step %d; writing its report again.", run.workdir, run.settings.steps)
    tasks, _, limit = _task_settings(run)
    done = st.log.downstream or {}
    if tasks and (done.get("step"), done.get("tasks"), done.get("limit")) != (steps, tasks, limit):
      _downstream(run, st, steps)  # eval.tasks set (or changed) since the run finished
  run.ckpt.wait()


def _summary(run: Run, st: RunState) -> dict:
  """The run's summary.json.  `student_initial`, `student_final` and `teacher_final` are on the
  whole validation split (`rows.final`); `teacher` is the controller's cached lT, on the rows it
  scores (`rows.controller`: the same rows unless ddk.eval_max_rows caps them)."""
  teacher = run.controller.teacher_losses
  teacher = None if teacher is None else [float(x) for x in teacher]
  initial, teacher_final = st.log.initial_student_losses, teacher
  if run.capped:
    initial = st.log.whole_initial_student_losses
    teacher_final = st.log.whole_teacher_losses if st.log.whole_teacher_rows == run.whole_rows_key else None
  summary = {
      "status": "done", "step": run.settings.steps, "mode": run.settings.mode, "domains": run.names,
      "student_initial": initial,
      "student_final": st.log.final_student_losses,
      "teacher": teacher,
      "teacher_final": teacher_final,
      "rows": {"seq_len": run.settings.seq_len,
               "controller": {"max_rows": run.settings.ddk.eval_max_rows,
                              "per_domain": dict(zip(run.names, run.rows_per_domain))},
               "final": {"max_rows": 0, "per_domain": dict(zip(run.names, run.whole_rows_per_domain))}},
      "weights": run.controller.weights.tolist(),
      "skipped_steps": st.skipped_total,
      "eval_seconds": st.log.eval_seconds,
      "controller_eval_seconds": st.log.controller_eval_seconds,
      "wall_seconds": st.wall_seconds(),
  }
  if st.log.downstream is not None and _task_settings(run)[0]:
    d = st.log.downstream
    summary["downstream"] = d["results"]
    summary["downstream_settings"] = {"step": d["step"], "tasks": d["tasks"], "limit": d["limit"], "num_fewshot": 0,
                                      "seconds": d["seconds"]}
  if run.is_main:
    reporting.write_report(run.workdir, summary, run.controller.history, run.settings)
  return summary

