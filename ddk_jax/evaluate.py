r"""Evaluate a distilled student per domain: validation CE and perplexity, next to the teacher's.

    python -m ddk_jax.evaluate --config=configs/demo.py --workdir=runs/demo
    python -m ddk_jax.evaluate --config=configs/demo.py --workdir=runs/demo --step=150 --max_rows=24
    python -m ddk_jax.evaluate --config=configs/tinyllama.py --hf_path=/models/tinyllama-ddk --out=eval.json \
        --config.teacher.path=/models/Llama-2-13b-hf
    python -m ddk_jax.evaluate --config=configs/demo.py --workdir=runs/demo --tasks=ddk_local --limit=100

The student is a run's checkpoint (`--workdir`, the latest committed step or `--step`) or a
Hugging Face directory (`--hf_path`, e.g. one written by `python -m ddk_jax.export`).  It is
scored on the whole validation split of the config's data (`--max_rows=N`: the first N rows
per domain, as `ddk.eval_max_rows` picks them), and so is the teacher, once, when the run
distilled from one: with `--workdir` the teacher the run used (its checkpointed config), with
`--hf_path` the config's teacher section.  `--teacher` scores the teacher even for a `cpt`
config, `--noteacher` skips it.  `--tasks` also runs downstream tasks on the student
(lm-evaluation-harness through `ddk_jax.downstream.run_tasks`; `--limit` documents per task,
`--num_fewshot` examples) and adds their accuracies to the table and the JSON.

Output: a table on stdout and a JSON file (default `<workdir>/eval/step_<N>.json`, or
`step_<N>_max_rows_<M>.json` with --max_rows; `--out` is required with --hf_path).  Every
process of a multi-host job runs the command (the eval steps are collective); process 0
prints and writes.  See docs/evaluation.md.

Exit status 2, with one line naming the problem and the fix: a bad flag, a --workdir that is
not a ddk_jax run, a --step without a committed checkpoint, a missing --hf_path, a domain
without validation data, an unusable teacher or output path, an unknown task or lm-eval not
installed.

`evaluate_checkpoint(cfg, ...)` is the same evaluation as a function returning the JSON's dict.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_log = logging.getLogger("ddk_jax")

FORMAT_VERSION = 1


class EvaluationError(ValueError):
  """An evaluation that cannot run as asked; the message says why and what to do."""


# ---- what to evaluate ------------------------------------------------------------------------


def check_arguments(*, workdir: str | None, step: int | None, hf_path: str | None, max_rows: int) -> None:
  """EvaluationError for a combination of arguments that cannot work (before any file is read)."""
  if (workdir is None) == (hf_path is None):
    raise EvaluationError("pass exactly one of --workdir=RUN_DIR (a ddk_jax run) and --hf_path=DIR (a Hugging Face "
                          "model directory).")
  if hf_path is not None and step is not None:
    raise EvaluationError("--step selects a checkpoint of a --workdir run; leave it out with --hf_path.")
  if step is not None and step < 0:
    raise EvaluationError(f"--step={step}: must be a checkpoint step (>= 0).")
  if max_rows < 0:
    raise EvaluationError(f"--max_rows={max_rows}: must be >= 0 (0: the whole validation split).")


def check_student_source(*, workdir: str | None, step: int | None, hf_path: str | None) -> int | None:
  """The checkpoint step to read from run `workdir`, or None after checking the `hf_path`
  directory (config.json and safetensors headers); EvaluationError naming the problem."""
  from ddk_jax import checkpointing, hf, storage
  if workdir is not None:
    try:
      return checkpointing.committed_step(storage.resolve(workdir), step)
    except checkpointing.NoSuchStepError as e:
      raise EvaluationError(str(e)) from None
  hf_path = storage.resolve(hf_path)
  if not storage.isdir(hf_path):
    raise EvaluationError(f"--hf_path={hf_path} does not exist; pass a Hugging Face model directory (config.json "
                          "+ safetensors), e.g. one written by python -m ddk_jax.export.")
  try:
    hf.validate_checkpoint_dir(hf_path)
  except ValueError as e:
    raise EvaluationError(f"--hf_path={hf_path}: {e}") from None
  return None



def default_output(workdir: str, step: int, max_rows: int = 0) -> str:
  """`<workdir>/eval/step_<N>.json` (whole split) or `step_<N>_max_rows_<M>.json`."""
  from ddk_jax import storage
  name = f"step_{step}.json" if not max_rows else f"step_{step}_max_rows_{max_rows}.json"
  return storage.join(workdir, "eval", name)


def _teacher_section(cfg: Any, run_config: Mapping | None, workdir: str | None) -> tuple[dict, int, str]:
  """(teacher section, seed of a random teacher, mode): the run's when evaluating a run, else the config's.

  A `workdir` teacher with a relative path lives in the run's workdir (as the trainer
  resolves it), or, without a run, in the current directory.
  """
  from ddk_jax import storage
  if run_config is not None:
    section, seed, mode = copy.deepcopy(dict(run_config["teacher"])), int(run_config["seed"]), run_config["mode"]
  else:
    section, seed, mode = cfg.teacher.to_dict(), int(cfg.seed), str(cfg.mode)
  if section.get("source") == "cache":
    section, seed = _teacher_of_cache(section, seed)
  path = str(section.get("path") or "")
  if section.get("source") == "workdir" and path and not storage.is_remote(path) and not os.path.isabs(path):
    section["path"] = os.path.join(workdir, path) if workdir else os.path.abspath(path)
  return section, seed + 1, mode  # the trainer initialises a random teacher from seed + 1


def _teacher_of_cache(section: dict, seed: int) -> tuple[dict, int]:
  """A run trained from a teacher cache never loaded its teacher: the teacher to score is the one
  the cache was made from (its manifest names it)."""
  from ddk_jax import storage, teacher_cache
  cache_dir = str(section.get("cache_dir") or "")
  manifest_path = storage.join(cache_dir, teacher_cache.MANIFEST) if cache_dir else ""
  try:
    made = json.loads(storage.read_text(manifest_path))["identity"]["teacher"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise EvaluationError(
        f"the teacher came from the cache in {cache_dir or '(teacher.cache_dir is empty)'}, whose manifest "
        f"cannot be read ({type(e).__name__}), so the teacher it was made from is unknown; pass "
        "--config.teacher.source=hf --config.teacher.path=DIR (or workdir), or --noteacher.") from None
  section = dict(section, source=made["source"], path=made.get("path") or "")
  if made["source"] == "random":
    seed = int(made["seed"]) - 1  # the cache records the teacher's own seed (the run's seed + 1)
  return section, seed


def _check_teacher_source(section: Mapping, where: str) -> None:
  from ddk_jax import checkpointing, storage
  source, path = section.get("source"), section.get("path")
  if source in ("hf", "workdir") and not path:
    raise EvaluationError(f"{where}teacher.source={source!r} but teacher.path is empty; pass "
                          "--config.teacher.path=DIR, or --noteacher.")
  if source == "hf":
    from ddk_jax import hf
    try:
      hf.validate_checkpoint_dir(path)
    except ValueError as e:
      raise EvaluationError(f"the teacher ({where}teacher.path={path}): {e} Pass --config.teacher.path=DIR, or "
                            "--noteacher.") from None
  elif source == "workdir" and not storage.is_remote(path) and checkpointing.latest_good_step(path) is None:
    raise EvaluationError(f"the teacher ({where}teacher.path={path}) has no committed checkpoint; pass "
                          "--config.teacher.path= a finished run, or --noteacher.")
  elif source not in ("random", "hf", "workdir"):
    raise EvaluationError(f"{where}teacher.source={source!r} is not one of random, hf, workdir.")


def _check_eval_batch(cfg: Any, mesh) -> int:
  """Rows per eval batch on this process (ddk.eval_batch_size over the processes)."""
  import jax
  from ddk_jax import sharding
  batch = int(cfg.ddk.eval_batch_size)
  rules = dict(sharding.rules_from_config(cfg.mesh.rules))
  axes = rules.get("batch") or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  dp = math.prod(int(mesh.shape[a]) for a in axes)
  if batch <= 0 or batch % dp or batch % jax.process_count():
    raise EvaluationError(f"ddk.eval_batch_size={batch} must be a positive multiple of the data-parallel size {dp} "
                          f"and of the process count {jax.process_count()}; pass --config.ddk.eval_batch_size=N.")
  return batch // jax.process_count()


# ---- scoring -----------------------------------------------------------------------------------


class _LoggedDomain:
  """A domain's validation batches that log (process 0) when the domain has been scored."""

  def __init__(self, batches: Any, who: str, index: int, total: int, rows: int):
    self._batches, self._who, self._index, self._total, self._rows = batches, who, index, total, rows

  def __call__(self):
    import jax
    t = time.time()
    yield from self._batches()
    if jax.process_index() == 0:
      k = self._batches.num_batches
      _log.info("%s: domain %d/%d %r: %d rows in %d batch%s, %.1f s", self._who, self._index, self._total,
                self._batches.domain, self._rows, k, "" if k == 1 else "es", time.time() - t)


def score(eval_fn: Any, params: Any, batches: Mapping[str, Any], mesh, rules, names: Sequence[str], *,
          who: str = "model", rows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
  """(per-domain mean CE, per-domain target tokens, seconds) of `params` over `batches`, over all
  hosts (`validation.evaluate_domains`), with a log line per domain."""
  from ddk_jax import validation
  rows = rows if rows is not None else [len(batches[n].rows) for n in names]
  logged = {n: _LoggedDomain(batches[n], who, i + 1, len(names), rows[i]) for i, n in enumerate(names)}
  t = time.time()
  losses, counts = validation.evaluate_domains(eval_fn, params, logged, mesh, rules, names)
  return losses, counts, time.time() - t


def _ppl(ce: float | None) -> float | None:
  if ce is None:
    return None
  return math.exp(ce) if ce < 700 else None  # JSON has no infinity


# ---- downstream tasks (--tasks, and eval.tasks in training) --------------------------------------

# Packed rows of the downstream adapter hold at least this many tokens (the local tasks' items
# are ~50-120 tokens with the demo's tokenizer); longer when the data's rows are longer.
MIN_TASK_SEQ_LEN = 256
_TASK_FLAGS = {"tasks": "--tasks", "limit": "--limit", "num_fewshot": "--num_fewshot"}


def split_tasks(tasks: str | Sequence[str] | None) -> list[str]:
  """Task names from a comma-separated string (or a list): blanks dropped, first occurrence kept."""
  if not tasks:
    return []
  parts = tasks.split(",") if isinstance(tasks, str) else list(tasks)
  return list(dict.fromkeys(p.strip() for p in parts if p and p.strip()))


def check_tasks(tasks: str | Sequence[str] | None, *, limit: int = 0, num_fewshot: int = 0,
                flags: Mapping[str, str] | None = None) -> list[str]:
  """The task names of `tasks`, after checking they can run: EvaluationError when lm-evaluation-harness
  is not installed, a name is neither a local task (ddk_local, ddk_<domain>) nor one of lm-eval's
  own tasks, or `limit` / `num_fewshot` is negative.  `flags` names the settings in messages
  (default: the evaluate command's --tasks, --limit, --num_fewshot)."""
  import importlib.util
  from ddk_jax.downstream import local_tasks
  flags = {**_TASK_FLAGS, **(flags or {})}
  names = split_tasks(tasks)
  if limit < 0:
    raise EvaluationError(f"{flags['limit']}={limit}: must be >= 0 (0: every document of each task).")
  if num_fewshot < 0:
    raise EvaluationError(f"{flags['num_fewshot']}={num_fewshot}: must be >= 0.")
  if not names:
    return names
  if importlib.util.find_spec("lm_eval") is None:
    raise EvaluationError(f"{flags['tasks']}={','.join(names)} needs lm-evaluation-harness: pip install "
                          "'ddk_jax[eval]' (or leave the tasks out).")
  local = set(local_tasks.TASKS) | {local_tasks.TAG}
  other = [n for n in names if n not in local]
  if other:  # lm-eval's task index takes ~10 s to build: only for names that are not local, once
    known = _lm_eval_task_names()
    unknown = [n for n in other if n not in known]
    if unknown:
      import difflib
      close = difflib.get_close_matches(unknown[0], sorted(local) + sorted(known), n=1, cutoff=0.7)
      hint = f" (did you mean {close[0]}?)" if close else ""
      raise EvaluationError(f"{flags['tasks']}: unknown task {unknown[0]!r}{hint}; use a local task "
                            f"({local_tasks.TAG} or {', '.join(local_tasks.TASKS)}) or one of lm-eval's own "
                            "(lm_eval ls tasks).")
  return names


@functools.lru_cache(maxsize=1)
def _lm_eval_task_names() -> frozenset[str]:
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.WARNING)  # lm-eval and datasets announce themselves at INFO
  try:
    from lm_eval.tasks import TaskManager
    return frozenset(TaskManager(include_defaults=True).all_tasks)
  finally:
    root.setLevel(level)


def task_seq_len(model_cfg: Any, data_seq_len: int) -> int:
  """Tokens per packed row of the downstream adapter: the data's row length, at least
  MIN_TASK_SEQ_LEN, at most the model's max_position_embeddings."""
  return min(int(model_cfg.max_position_embeddings), max(MIN_TASK_SEQ_LEN, int(data_seq_len)))


def task_adapter(params: Any, model_cfg: Any, tokenizer: Any, *, data_seq_len: int, batch_size: int, mesh,
                 rules) -> Any:
  """The lm-eval model (`DDKJaxLM`) over `params` on `mesh`, compiled once for rows of
  `task_seq_len(...)` tokens, `batch_size` rows per forward; `update_params` swaps in new values."""
  from ddk_jax.downstream import DDKJaxLM
  return DDKJaxLM(params, model_cfg, tokenizer, seq_len=task_seq_len(model_cfg, data_seq_len),
                  batch_size=batch_size, mesh=mesh, rules=rules)


def run_downstream(adapter: Any, tasks: str | Sequence[str], *, limit: int = 0, num_fewshot: int = 0,
                   corpus_dir: str | None = None) -> tuple[dict, dict]:
  """`ddk_jax.downstream.run_tasks` on `adapter` (on every process); returns (results, settings):
  `{task: {metric: value}}` and what was run (tasks, limit, num_fewshot, seq_len, batch_size,
  seconds).  Local tasks come from `corpus_dir`'s validation documents (the run's demo corpus)."""
  from ddk_jax.downstream import run_tasks
  names = split_tasks(tasks)
  t = time.time()
  results = run_tasks(adapter, names, limit=limit or None, num_fewshot=num_fewshot, corpus_dir=corpus_dir or None)
  settings = {"tasks": names, "limit": int(limit), "num_fewshot": int(num_fewshot),
              "seq_len": adapter.forward.seq_len, "batch_size": adapter.batch_size, "seconds": time.time() - t}
  return results, settings


def mean_accuracy(results: Mapping[str, Mapping[str, float]]) -> float | None:
  """The unweighted mean of the tasks' `acc` (None when no task reports one)."""
  accs = [m["acc"] for m in results.values() if "acc" in m]
  return float(np.mean(accs)) if accs else None


def describe_tasks(settings: Mapping) -> str:
  """One line: which downstream tasks ran, on how many documents, with how many examples."""
  limit = settings["limit"]
  docs = "every document" if not limit else f"at most {limit} documents"
  return (f"downstream tasks {', '.join(settings['tasks'])}: {docs} per task, {settings['num_fewshot']}-shot, "
          f"{settings['seconds']:.1f} s")


def format_tasks_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """Downstream results as a text table: task, acc, its stderr, acc_norm, documents; a mean line."""
  def num(x, fmt):
    return "-" if x is None else format(x, fmt)

  headers = ["task", "acc", "+-stderr", "acc_norm", "documents"]
  body = [[task, num(m.get("acc"), ".4f"), num(m.get("acc_stderr"), ".4f"), num(m.get("acc_norm"), ".4f"),
           num(m.get("num_samples"), ".0f")] for task, m in results.items()]
  norms = [m["acc_norm"] for m in results.values() if "acc_norm" in m]
  mean = ["mean", num(mean_accuracy(results), ".4f"), "", num(float(np.mean(norms)) if norms else None, ".4f"), ""]
  widths = [max(len(h), len(mean[k]), *(len(row[k]) for row in body)) for k, h in enumerate(headers)]

  def line(cells):
    return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

  rule = "  ".join("-" * w for w in widths)
  return "\n".join([line(headers), rule] + [line(r) for r in body] + [rule, line(mean)])


def evaluate_checkpoint(cfg: Any, *, workdir: str | None = None, step: int | None = None,
                        hf_path: str | None = None, max_rows: int = 0, teacher: bool | None = None,
                        progress: bool | None = None, tasks: str | Sequence[str] | None = None, limit: int = 0,
                        num_fewshot: int = 0) -> dict:
  """Scores a student (a run's checkpoint, or an HF directory) and its teacher per domain.

  Args:
    cfg: the experiment config (a ConfigDict): its `data` (validation split), `mesh`,
      `ddk.eval_batch_size` and `loss.impl` say what to score and how; its `teacher` is the
      teacher when there is no run (`hf_path`), its `student.model` run-time fields
      (compute dtype, remat, ...) how to run an HF student.
    workdir, step: a ddk_jax run and one of its committed steps (default: the latest). The
      run's own config gives the student's model and the teacher (the sources it used);
      an empty `data.tokenizer` falls back to the run's.
    hf_path: instead of a run, a Hugging Face directory (the default tokenizer when
      `data.tokenizer` is empty).
    max_rows: rows per domain, over all hosts (0: the whole validation split); the same rows
      `ddk.eval_max_rows` picks.
    teacher: score the teacher too; None: when the run (or the config, with `hf_path`)
      distils from one (mode is not cpt).
    progress: progress bars while reading an HF checkpoint (None: on a terminal).
    tasks, limit, num_fewshot: downstream tasks to run on the student as well (names or a
      comma-separated string; `check_tasks` says which), at most `limit` documents per task
      (0: all), with `num_fewshot` examples; the result then has `downstream` (`{task:
      {metric: value}}`) and `downstream_settings`.

  Returns the JSON-ready result (see docs/evaluation.md); identical on every process.
  Raises EvaluationError (and the ValueErrors of the data config, HF checkpoints, ...) for
  inputs that cannot work, checkpointing.CheckpointError for unreadable checkpoints.
  """
  import jax
  import ml_collections
  from ddk_jax import checkpointing, ddk, run_setup, sharding, storage, validation
  from ddk_jax import data as data_lib
  from ddk_jax import train_step as ts

  started = time.time()
  check_arguments(workdir=workdir, step=step, hf_path=hf_path, max_rows=max_rows)
  task_names = check_tasks(tasks, limit=limit, num_fewshot=num_fewshot)
  cfg = copy.deepcopy(cfg)

  # ---- the student's source, the teacher's, the data: cheap checks first ----
  run_config = None
  step = check_student_source(workdir=workdir, step=step, hf_path=hf_path)
  if workdir is not None:
    workdir = storage.resolve(workdir)
    reader = checkpointing.open_reader(workdir)
    try:
      run_config = checkpointing.restore_meta(reader, step)["config"]
    finally:
      reader.close()
    student_info = {"source": "workdir", "workdir": workdir, "step": step}
  else:
    hf_path = storage.resolve(hf_path)
    student_info = {"source": "hf", "path": hf_path}
  section, teacher_seed, mode = _teacher_section(cfg, run_config, workdir)
  use_teacher = ddk.uses_teacher(mode) if teacher is None else bool(teacher)
  where = "the run's " if run_config is not None else ""
  if use_teacher:
    _check_teacher_source(section, where)
  if not cfg.data.tokenizer:
    fallback = (run_config or {}).get("data", {}).get("tokenizer") or hf_path
    if not fallback and cfg.student.source == "hf":
      fallback = cfg.student.path
    cfg.data.tokenizer = fallback or ""
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh.rules)
  batch_size = _check_eval_batch(cfg, mesh)
  is_main = jax.process_index() == 0

  tokenizer = data_lib.load_tokenizer_from_config(cfg.data)
  names = data_lib.domain_names(cfg.data)
  if cfg.data.get("demo_corpus_dir"):
    from ddk_jax.demo import corpus
    corpus.ensure_demo_corpus(cfg.data.demo_corpus_dir, log=_log.info)
  manifest = data_lib.ensure_prepared(cfg.data, progress=is_main)
  batches = data_lib.build_validation(cfg.data, batch_size=batch_size, manifest=manifest, tokenizer=tokenizer,
                                      max_rows=max_rows)
  rows = run_setup.validation_rows(batches, names)
  rows_key = validation.rows_key(json.loads(cfg.data.to_json_best_effort()), num_processes=jax.process_count(),
                                 eval_max_rows=max_rows, eval_batch_size=int(cfg.ddk.eval_batch_size))
  _log.info("validation: %s (%s rows of %d tokens)", "whole split" if not max_rows else f"first {max_rows} rows",
            ", ".join(f"{n} {r}" for n, r in zip(names, rows)), int(cfg.data.seq_len))
  # Plain CE over the tokenizer's ids (rows an embedding is padded with get no mass), as the trainer scores.
  opts = ts.StepOptions(num_domains=len(names), mode="cpt", loss=ts.LossSpec(
      impl=str(cfg.loss.impl), chunk_size=int(cfg.loss.chunk_size), valid_vocab=tokenizer.max_id + 1))

  # ---- the student ----
  t = time.time()
  if workdir is not None:
    student_cfg, params = checkpointing.restore_student_params(workdir, mesh, rules, step=step)
  else:
    from ddk_jax import hf
    params, student_cfg = hf.load_hf_checkpoint(hf_path, mesh=mesh, rules=rules, progress=progress,
                                                config_overrides=run_setup._run_time_overrides(cfg.student))
  load_seconds = time.time() - t
  data_lib.check_vocab_fits(tokenizer, student_cfg.vocab_size, "the student")
  eval_student = ts.jit_eval_step(ts.make_eval_step(student_cfg, opts), ts.params_shardings(student_cfg, mesh, rules),
                                  mesh, rules)
  ls, counts, student_seconds = score(eval_student, params, batches, mesh, rules, names, who="student", rows=rows)
  downstream = downstream_settings = None
  if task_names:
    adapter = task_adapter(params, student_cfg, tokenizer, data_seq_len=int(cfg.data.seq_len),
                           batch_size=int(cfg.ddk.eval_batch_size), mesh=mesh, rules=rules)
    downstream, downstream_settings = run_downstream(adapter, task_names, limit=limit, num_fewshot=num_fewshot,
                                                     corpus_dir=cfg.data.get("demo_corpus_dir"))
    del adapter
    _log.info("downstream tasks: %s (%.1f s)", ", ".join(
        f"{t} acc {m['acc']:.4f}" for t, m in downstream.items() if "acc" in m), downstream_settings["seconds"])
  del params

  # ---- the teacher, on the student's vocabulary (as the KD term and the trainer score it) ----
  lt, teacher_info, teacher_seconds = None, None, 0.0
  if use_teacher:
    t = time.time()
    teacher_cfg, teacher_params = run_setup._load_model(
        ml_collections.ConfigDict({"teacher": section}), "teacher", mesh, rules, teacher_seed)
    load_seconds += time.time() - t
    if teacher_cfg.vocab_size < student_cfg.vocab_size:
      raise EvaluationError(f"the teacher's vocab_size={teacher_cfg.vocab_size} < the student's "
                            f"{student_cfg.vocab_size}: they do not share a tokenizer; pass --noteacher.")
    eval_teacher = ts.jit_eval_step(ts.make_eval_step(teacher_cfg, opts, vocab_size=student_cfg.vocab_size),
                                    ts.params_shardings(teacher_cfg, mesh, rules), mesh, rules)
    lt, _, teacher_seconds = score(eval_teacher, teacher_params, batches, mesh, rules, names, who="teacher",
                                   rows=rows)
    del teacher_params
    teacher_info = {"source": section.get("source"), "path": section.get("path") or None,
                    "from": "run" if run_config is not None else "config"}

  domains = {}
  for i, n in enumerate(names):
    d = {"rows": rows[i], "tokens": int(counts[i]), "student_ce": float(ls[i]), "student_ppl": _ppl(float(ls[i]))}
    if lt is not None:
      d |= {"teacher_ce": float(lt[i]), "teacher_ppl": _ppl(float(lt[i])), "ratio": float(ls[i] / lt[i])}
    domains[n] = d
  mean = {"student_ce": float(np.mean(ls)), "student_ppl": float(np.mean([math.exp(min(x, 700)) for x in ls]))}
  if lt is not None:
    mean |= {"teacher_ce": float(np.mean(lt)), "teacher_ppl": float(np.mean([math.exp(min(x, 700)) for x in lt]))}
  result = {
      "format_version": FORMAT_VERSION,
      "student": student_info,
      "teacher": teacher_info,
      "validation": {"whole_split": not max_rows, "max_rows": max_rows, "seq_len": int(cfg.data.seq_len),
                     "eval_batch_size": int(cfg.ddk.eval_batch_size), "num_processes": jax.process_count(),
                     "scored_vocab": tokenizer.max_id + 1, "rows_key": rows_key},
      "domains": domains,
      "mean": mean,
      "seconds": {"load": load_seconds, "student": student_seconds, "teacher": teacher_seconds,
                  "total": time.time() - started},
  }
  if downstream is not None:
    result["downstream"] = downstream
    result["downstream_settings"] = downstream_settings
    result["seconds"]["downstream"] = downstream_settings["seconds"]
  return result


# ---- output ------------------------------------------------------------------------------------


def format_table(result: Mapping) -> str:
  """The result as a text table: domain, rows, student CE, teacher CE, lS/lT, perplexities; a mean line."""
  has_teacher = result.get("teacher") is not None

  def num(x, fmt):
    return "-" if x is None else format(x, fmt)

  headers = ["domain", "rows", "student CE", "teacher CE", "lS/lT", "student ppl", "teacher ppl"]
  body = []
  for name, d in result["domains"].items():
    body.append([name, str(d["rows"]), num(d["student_ce"], ".4f"), num(d.get("teacher_ce"), ".4f"),
                 num(d.get("ratio"), ".4f"), num(d["student_ppl"], ".2f"), num(d.get("teacher_ppl"), ".2f")])
  m = result["mean"]
  body.append(["mean", "", num(m["student_ce"], ".4f"), num(m.get("teacher_ce"), ".4f"), "",
               num(m["student_ppl"], ".2f"), num(m.get("teacher_ppl"), ".2f")])
  if not has_teacher:
    keep = [0, 1, 2, 5]
    headers, body = [headers[k] for k in keep], [[row[k] for k in keep] for row in body]
  widths = [max(len(h), *(len(row[k]) for row in body)) for k, h in enumerate(headers)]

  def line(cells):
    return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

  rule = "  ".join("-" * w for w in widths)
  return "\n".join([line(headers), rule] + [line(r) for r in body[:-1]] + [rule, line(body[-1])])


def describe(result: Mapping) -> str:
  """One line: what was scored on which rows."""
  s = result["student"]
  who = f"{s['workdir']} step {s['step']}" if s["source"] == "workdir" else s["path"]
  v = result["validation"]
  rows = "the whole validation split" if v["whole_split"] else f"the first {v['max_rows']} validation rows per domain"
  return f"student {who}, {rows} (rows of {v['seq_len']} tokens)"


def write_result(result: Mapping, path: str) -> str:
  """Writes the result as JSON (atomically; the directory is created); returns the path."""
  from ddk_jax import storage
  storage.makedirs(_parent(path))
  storage.write_bytes_atomic(path, (json.dumps(result, indent=1) + "\n").encode())
  return path


# ---- command line ------------------------------------------------------------------------------


def _define_flags() -> dict:
  from absl import flags
  from ml_collections import config_flags
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "Experiment config file (configs/*.py) with get_config(): its data (validation split), "
          "mesh and ddk.eval_batch_size; with --hf_path also its teacher. Override any key with "
          "--config.<key>=<value>; every key is documented in docs/config.md.", lock_config=True),
      "workdir": flags.DEFINE_string("workdir", None, "A ddk_jax run directory: evaluate its student checkpoint."),
      "step": flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest committed)."),
      "hf_path": flags.DEFINE_string("hf_path", None, "Instead of --workdir: a Hugging Face model directory "
                                     "(config.json + safetensors), e.g. from python -m ddk_jax.export."),
      "max_rows": flags.DEFINE_integer("max_rows", 0, "Validation rows (of data.seq_len tokens) per domain, over all "
                                       "hosts, as ddk.eval_max_rows picks them; 0: the whole validation split."),
      "out": flags.DEFINE_string("out", None, "JSON output file (default: <workdir>/eval/step_<N>.json, or "
                                 "step_<N>_max_rows_<M>.json; required with --hf_path)."),
      "teacher": flags.DEFINE_bool("teacher", None, "Score the teacher too (default: when the run, or the config "
                                   "with --hf_path, distils from one, i.e. mode is not cpt); --noteacher skips it."),
      "tasks": flags.DEFINE_string("tasks", None, "Downstream tasks to run on the student too, comma-separated: "
                                   "ddk_local (the demo's local tasks), ddk_<domain>, or lm-eval's own tasks whose "
                                   "data is on this machine (docs/downstream.md). Needs pip install "
                                   "'ddk_jax[eval]'."),
      "limit": flags.DEFINE_integer("limit", 0, "With --tasks: at most this many documents per task (0: all)."),
      "num_fewshot": flags.DEFINE_integer("num_fewshot", 0, "With --tasks: few-shot examples before each question."),
  }


def _main(argv, f: dict) -> None:
  from ddk_jax import cli

  cfg = cli.require_config(argv, f["config"].value, "the experiment whose validation data to score")
  workdir, hf_path, step, out = f["workdir"].value, f["hf_path"].value, f["step"].value, f["out"].value
  max_rows = f["max_rows"].value
  tasks, limit, num_fewshot = f["tasks"].value, f["limit"].value, f["num_fewshot"].value
  from ddk_jax import storage
  try:  # what can be checked before JAX starts, on every process
    check_arguments(workdir=workdir, step=step, hf_path=hf_path, max_rows=max_rows)
    if not split_tasks(tasks) and (limit or num_fewshot):
      given = "--limit" if limit else "--num_fewshot"
      raise EvaluationError(f"{given} applies to downstream tasks; pass --tasks=... (e.g. --tasks=ddk_local) or "
                            f"leave {given} out.")
    tasks = check_tasks(tasks, limit=limit, num_fewshot=num_fewshot)
    if hf_path is not None and not out:
      raise EvaluationError("--out=FILE.json is required with --hf_path (with --workdir it defaults to "
                            "<workdir>/eval/step_<N>.json).")
    step = check_student_source(workdir=workdir, step=step, hf_path=hf_path)
    out = storage.resolve(out) if out else default_output(storage.resolve(workdir), step, max_rows)
    _check_output(out)
  except (ValueError, OSError) as e:
    raise cli.UsageError(str(e)) from None
  from ddk_jax import multihost
  cli.setup_logging(logging.WARNING)  # the start is not announced: an error below stays one line
  multihost.initialize_or_exit()
  cli.setup_logging()
  import jax
  from absl import flags
  from ddk_jax import checkpointing
  from ddk_jax.errors import TrainingError

  _enable_compilation_cache(cfg.compilation_cache_dir)
  try:
    result = evaluate_checkpoint(cfg, workdir=workdir, step=step, hf_path=hf_path, max_rows=max_rows,
                                 teacher=f["teacher"].value, tasks=tasks, limit=limit, num_fewshot=num_fewshot)
    result["config_file"] = os.path.abspath(flags.FLAGS["config"].config_filename)
    if jax.process_index() == 0:
      write_result(result, out)
  except (ValueError, OSError, checkpointing.CheckpointError, TrainingError) as e:
    text = str(e).strip()
    cli.fail(text.splitlines()[0] if text else type(e).__name__)
  if jax.process_index() == 0:
    print(describe(result))
    print(format_table(result))
    if "downstream" in result:
      print()
      print(describe_tasks(result["downstream_settings"]))
      print(format_tasks_table(result["downstream"]))
    print(f"wrote {out} ({result['seconds']['total']:.1f} s)")


def _check_output(path: str) -> None:
  """A local output file must be creatable: its directory exists (or can be made) and is writable."""
  from ddk_jax import storage
  if storage.is_remote(path):
    return  # checked by the upload itself
  if os.path.isdir(path):
    raise EvaluationError(f"--out={path} is a directory; pass a file name, e.g. --out={path.rstrip('/')}/eval.json.")
  parent = _parent(path)
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise EvaluationError(f"cannot create the directory of the output {path} ({e.strerror or e}); pass --out= a "
                          "file in a directory you can write to.") from None
  if not os.access(parent, os.W_OK):
    raise EvaluationError(f"cannot write the output {path}: {parent} is not writable; pass --out= a file in a "
                          "directory you can write to.")


def _parent(path: str) -> str:
  from ddk_jax import storage
  return path.rsplit("/", 1)[0] if storage.is_remote(path) else (os.path.dirname(path) or ".")


def _enable_compilation_cache(cache_dir: str) -> None:
  """JAX's persistent compilation cache in `compilation_cache_dir`, as `ddk_jax.main` uses it."""
  if not cache_dir:
    return
  import jax
  from ddk_jax import storage
  path = cache_dir if storage.is_remote(cache_dir) else os.path.abspath(os.path.expanduser(cache_dir))
  try:
    if not storage.is_remote(path):
      os.makedirs(path, exist_ok=True)
  except OSError as e:
    _log.warning("compilation_cache_dir=%r cannot be created (%s); compiling without a persistent cache.", cache_dir, e)
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run() -> None:
  from ddk_jax import cli
  f = _define_flags()
  cli.run(lambda argv: _main(argv, f), prog="ddk_jax.evaluate")


if __name__ == "__main__":
  run()
