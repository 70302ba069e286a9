"""`run_tasks`: lm-eval tasks (the local ones and any other whose data is on this machine)
over a `DDKJaxLM`, results as `{task: {metric: value}}`."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import jax

from ddk_jax import multihost
from ddk_jax.downstream import local_tasks

_log = logging.getLogger("ddk_jax.downstream")

DEFAULT_TASK_DIR = os.environ.get("DDK_DOWNSTREAM_TASKS", os.path.join("runs", "downstream_tasks"))


def _split_tasks(tasks: str | Sequence[Any]) -> list[Any]:
  if isinstance(tasks, str):
    tasks = [t.strip() for t in tasks.split(",")]
  out = []
  for t in tasks:
    if t == local_tasks.TAG:
      out.extend(local_tasks.TASKS)
    elif t:
      out.append(t)
  return list(dict.fromkeys(out)) if all(isinstance(t, str) for t in out) else out


def _metrics(entry: dict[str, Any]) -> dict[str, float]:
  """lm-eval's `{"acc,none": .., "acc_stderr,none": .., "alias": ..}` -> `{"acc": .., "acc_stderr": ..}`
  (a filter other than "none" stays in the name: `exact_match/strict-match`)."""
  out = {}
  for key, value in entry.items():
    if "," not in key or isinstance(value, str) or value is None:
      continue
    name, filt = key.split(",", 1)
    out[name if filt == "none" else f"{name}/{filt}"] = float(value)
  return out


def run_tasks(model_adapter, tasks: str | Sequence[Any], *, limit: int | float | None = None, num_fewshot: int = 0,
              task_dir: str | None = None, corpus_dir: str | None = None, include_path: str | None = None,
              bootstrap_iters: int = 1000, seed: int = 1234) -> dict[str, dict[str, float]]:
  """Runs lm-eval tasks on `model_adapter` (a `DDKJaxLM`) and returns `{task: {metric: value}}`.

  Args:
    tasks: names (a list, or one comma-separated string) or lm-eval task config dicts.
      `ddk_local` stands for every local task (`ddk_records`, `ddk_math`, `ddk_code`,
      `ddk_docstrings`, `ddk_prose`); other names are lm-eval's own tasks or tasks found
      under `include_path`, whose data must be on this machine (no downloads).
    limit: at most this many documents per task (a float < 1: that fraction).
    num_fewshot: examples from the task's few-shot split put before each question.
    task_dir: where the local tasks live ($DDK_DOWNSTREAM_TASKS, default
      runs/downstream_tasks); generated there from `corpus_dir` (default
      runs/demo_corpus, built when absent) unless already there.
    include_path: a directory of extra lm-eval task YAML files.
    bootstrap_iters: resamples for stderrs of metrics without a closed form (0: none).
    seed: seeds lm-eval's python / numpy / torch RNGs and its few-shot sampler.

  Results per task: each metric lm-eval reports (`acc`, `acc_norm`, ...), its stderr
  (`acc_stderr`, when computed), and `num_samples` (documents evaluated).

  Several processes: call it on every process with the same arguments.  Process 0 runs
  the harness; the others serve its batches (`DDKJaxLM.serve`).  Every process returns
  the same results.
  """
  names = _split_tasks(tasks)
  if not names:
    raise ValueError("no tasks given")
  if jax.process_count() > 1 and jax.process_index() != 0:
    model_adapter.serve()
    return multihost.broadcast_json(None)

  ok = False
  try:
    results = _evaluate(model_adapter, names, limit=limit, num_fewshot=num_fewshot, task_dir=task_dir,
                        corpus_dir=corpus_dir, include_path=include_path, bootstrap_iters=bootstrap_iters, seed=seed)
    ok = True
  finally:
    model_adapter.stop(ok)
  if jax.process_count() > 1:
    results = multihost.broadcast_json(results)
  return results


def _evaluate(model_adapter, names: list[Any], *, limit, num_fewshot, task_dir, corpus_dir, include_path,
              bootstrap_iters, seed) -> dict[str, dict[str, float]]:
  import lm_eval
  from lm_eval.tasks import TaskManager

  specs: list[Any] = []
  local = [n for n in names if isinstance(n, str) and n in local_tasks.TASKS]
  if local:
    task_dir = task_dir or DEFAULT_TASK_DIR
    local_tasks.ensure_local_tasks(task_dir, corpus_dir, tasks=local, log=_log.info)
  for n in names:
    specs.append(local_tasks.task_config(n, task_dir) if n in local else n)
  # lm-eval's own task index takes seconds to build: only when a task is neither local nor
  # under include_path.
  wanted = [s for s in specs if isinstance(s, str)]
  manager = TaskManager(include_path=include_path, include_defaults=False)
  if any(s not in manager.all_tasks for s in wanted):
    manager = TaskManager(include_path=include_path, include_defaults=True)
    missing = [s for s in wanted if s not in manager.all_tasks]
    if missing:
      raise ValueError(f"unknown lm-eval tasks {missing}: not local ({', '.join(local_tasks.TASKS)}, "
                       f"{local_tasks.TAG}), not lm-eval's own and not under include_path={include_path!r}")
  out = lm_eval.simple_evaluate(model=model_adapter, tasks=specs, num_fewshot=num_fewshot, limit=limit,
                                bootstrap_iters=bootstrap_iters, task_manager=manager, log_samples=False,
                                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                fewshot_random_seed=seed)
  results = {}
  for task, entry in out["results"].items():
    metrics = {k: v for k, v in _metrics(entry).items() if math.isfinite(v)}
    n = out.get("n-samples", {}).get(task, {}).get("effective")
    if n is not None:
      metrics["num_samples"] = float(n)
    results[task] = metrics
  return results
