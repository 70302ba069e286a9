r"""The paper's comparison in one command: every mode from the same teacher and student base,
at the same token budget, evaluated the same way.

    python -m ddk_jax.compare --config=configs/demo.py --workdir=runs/compare \
        --modes=cpt,kd,ddk,ddk_no_smoothing,ddk_equal_sampling [--seeds=0,1,2] \
        [--variant='ddk_excess: ddk, ddk.discrepancy="excess"' ...] \
        [--tasks=ddk_local --limit=200] [--config.<key>=<value> ...]

For every (mode, seed) it trains `<workdir>/<mode>_s<seed>` with `trainer.train` (the config's
`steps` and `global_batch_size` for all: the same tokens), then scores each student on the whole
validation split (`evaluate.evaluate_checkpoint`, the teacher once) and, with `--tasks`, on
downstream tasks, and writes `<workdir>/comparison.md` and `<workdir>/comparison.json`:
per-domain perplexity per mode (mean and standard deviation over seeds), mean perplexity, the
worst domain's student/teacher CE ratio, downstream accuracies, plots, and whether the paper's
orderings hold in these numbers.

Variants: `--variant='NAME: MODE, KEY=VALUE, ...'` (repeatable) adds runs named NAME that train
with MODE and the config keys given (values are Python literals: numbers, quoted strings, dicts
such as `ddk.floor={"math": 0.1}`; anything else is a string). They are compared like modes and
also against kd and ddk, gap by gap with the seeds' spread. With variants and no `--modes`,
only the variants run.

Shared models: a teacher or student read from a run directory given by a relative path
(`<model>.source='workdir'`, e.g. the demo's pre-trained `teacher` and `student_base`) lives in
`<workdir>/shared/<path>`, pre-trained there once (with the config's own seed) when the config
asks for it, and every run starts from it.  Hugging Face and absolute paths are used as they are.

Seeds: seed S offsets the config's `seed` (random initialisation, of a randomly initialised
student) and `data.seed` (the order of each domain's documents and the mixture's draws) by S;
`--seeds=0` is the config as it is.  The teacher and the student base are never re-drawn.
Because `data.seed` also keys the prepared shards, a seed S > 0 tokenizes the data again into
`<workdir>/shared/prepared_s<S>`; and because it also picks the documents a domain without
validation files holds out, such configs only compare `--seeds=0` (another seed would validate
on documents the shared models trained on).

Resumable: a run that finished (summary.json at the config's step count, same settings) is
skipped, an interrupted one resumes, and an evaluation already written for the same step and
settings (`<run>/eval/step_<N>.json`) is reused.  Rerun the same command after an interruption.

Exit status: 0 done; 2 a bad command line, config or input (one line naming it and the fix);
3 non-finite steps; 4 a checkpoint could not be written or read; 143 preempted (SIGTERM).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ddk_jax import ddk, evaluate, storage

_log = logging.getLogger("ddk_jax")

FORMAT_VERSION = 1
DEFAULT_MODES = ",".join(ddk.MODES)
EXIT_CONFIG, EXIT_NON_FINITE, EXIT_CHECKPOINT, EXIT_PREEMPTED = 2, 3, 4, 143
# The paper's orderings: lower mean perplexity and higher downstream accuracy, best first.
PAPER_ORDER = ("ddk", "kd", "cpt")
ABLATIONS = ("ddk_no_smoothing", "ddk_equal_sampling")
SEED_POLICY = ("seed S offsets the config's seed (random initialisation) and data.seed (document order and mixture "
               "draws) by S; the teacher and the student base are shared by every run and never re-drawn")


class CompareError(ValueError):
  """A comparison that cannot run as asked; the message says why and what to do."""


# ---- what to run -------------------------------------------------------------------------------


def parse_modes(text: str | None) -> list[str]:
  """`--modes`: a comma-separated list of ddk_jax modes, each once."""
  import difflib
  modes = [m.strip() for m in (text or "").split(",") if m.strip()]
  if not modes:
    raise CompareError(f"--modes is empty; pass modes to compare, e.g. --modes={DEFAULT_MODES}.")
  for m in modes:
    if m not in ddk.MODES:
      close = difflib.get_close_matches(m, ddk.MODES, n=1, cutoff=0.6)
      hint = f"did you mean {close[0]}? " if close else ""
      raise CompareError(f"--modes: unknown mode {m!r}; {hint}modes: {', '.join(ddk.MODES)}.")
  dup = sorted({m for m in modes if modes.count(m) > 1})
  if dup:
    raise CompareError(f"--modes names {dup[0]} twice; list each mode once.")
  return modes


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named run setting of a comparison: a mode plus config overrides."""
  name: str
  mode: str
  overrides: tuple[tuple[str, Any], ...] = ()


def _split_top_level(text: str) -> list[str]:
  """`text` split on commas outside brackets and quotes."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts]


def _literal(text: str) -> Any:
  import ast
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_variant(text: str) -> Variant:
  """`--variant='NAME: MODE, KEY=VALUE, ...'`."""
  import re
  example = "e.g. --variant='ddk_excess: ddk, ddk.discrepancy=\"excess\"'"
  name, sep, rest = text.partition(":")
  name = name.strip()
  if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
    raise CompareError(f"--variant={text!r}: expected NAME: MODE, KEY=VALUE, ... with NAME of letters, digits, "
                       f"'_', '.' or '-'; {example}.")
  if name in ddk.MODES:
    raise CompareError(f"--variant {name}: {name} is a mode's name; give the variant another name.")
  fields = _split_top_level(rest)
  mode = fields[0]
  if mode not in ddk.MODES:
    raise CompareError(f"--variant {name}: {mode!r} is not a mode; the first field after the name is one of "
                       f"{', '.join(ddk.MODES)} ({example}).")
  overrides = []
  for field in fields[1:]:
    key, eq, value = field.partition("=")
    key = key.strip()
    if not eq or not key:
      raise CompareError(f"--variant {name}: {field!r} is not KEY=VALUE; {example}.")
    if key == "mode":
      raise CompareError(f"--variant {name}: the mode is the first field after the name, not a KEY=VALUE.")
    overrides.append((key, _literal(value.strip())))
  return Variant(name=name, mode=mode, overrides=tuple(overrides))


def parse_variants(texts: Sequence[str] | None) -> list[Variant]:
  """Every `--variant`, each name once."""
  variants = [parse_variant(t) for t in texts or ()]
  names = [v.name for v in variants]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise CompareError(f"--variant names {dup[0]} twice; give each variant its own name.")
  return variants


def apply_overrides(cfg: Any, variant: Variant) -> Any:
  """A copy of `cfg` with the variant's mode and keys set; CompareError naming a key that is not in
  the config or a value of the wrong type."""
  import difflib
  cfg = copy.deepcopy(cfg)
  cfg.mode = variant.mode
  for key, value in variant.overrides:
    parts = key.split(".")
    node = cfg
    for k, part in enumerate(parts):
      have = list(node.keys()) if hasattr(node, "keys") else []
      if part not in have:
        near = difflib.get_close_matches(part, have, n=1)
        where = ".".join(parts[:k]) or "the config"
        hint = f"; did you mean {'.'.join(parts[:k] + near)}?" if near else ""
        raise CompareError(f"--variant {variant.name}: {key} is not a config key ({part!r} is not in {where}){hint}")
      if k < len(parts) - 1:
        node = node[part]
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError, AttributeError) as e:
      raise CompareError(f"--variant {variant.name}: {key}={value!r}: {e}") from None
  return cfg


def parse_seeds(text: str | None) -> list[int]:
  """`--seeds`: comma-separated non-negative integers, each once (default: 0)."""
  parts = [s.strip() for s in (text if text is not None else "0").split(",") if s.strip()]
  if not parts:
    raise CompareError("--seeds is empty; pass seed offsets, e.g. --seeds=0 or --seeds=0,1,2.")
  seeds = []
  for p in parts:
    try:
      s = int(p)
    except ValueError:
      raise CompareError(f"--seeds: {p!r} is not an integer; pass comma-separated seed offsets, e.g. "
                         "--seeds=0,1,2.") from None
    if s < 0:
      raise CompareError(f"--seeds: {s} is negative; seeds are offsets >= 0 (0: the config's own seeds).")
    if s in seeds:
      raise CompareError(f"--seeds names {s} twice; list each seed once.")
    seeds.append(s)
  return seeds


@dataclasses.dataclass
class RunSpec:
  name: str  # <label>_s<seed>
  label: str  # the mode, or the variant's name: what the tables call it
  mode: str  # the mode it trains with
  seed: int
  workdir: str
  cfg: Any  # the run's config (ConfigDict)


@dataclasses.dataclass
class Plan:
  workdir: str
  shared_dir: str
  base: Any  # the config with shared model paths; its own seeds (the evaluation's data and the shared models)
  modes: list[str]  # labels: modes and variant names, in order
  seeds: list[int]
  runs: list[RunSpec]
  variants: list[Variant] = dataclasses.field(default_factory=list)


def shared_config(cfg: Any, workdir: str) -> Any:
  """`cfg` with each model read from a run directory by a relative path moved under
  `<workdir>/shared/` (pre-trained there once, read by every run)."""
  cfg = copy.deepcopy(cfg)
  shared = storage.join(workdir, "shared")
  for which in ("teacher", "student"):
    section = cfg[which]
    path = str(section.path or "")
    if section.source == "workdir" and path and not storage.is_remote(path) and not os.path.isabs(path):
      section.path = storage.join(shared, path)
  return cfg


def make_plan(cfg: Any, workdir: str, modes: Sequence[str | Variant], seeds: Sequence[int]) -> Plan:
  """The runs of the comparison: one config per (mode or variant, seed), in `modes` order, seeds inner."""
  workdir = storage.resolve(workdir)
  base = shared_config(cfg, workdir)
  entries = [m if isinstance(m, Variant) else Variant(name=m, mode=m) for m in modes]
  names = [e.name for e in entries]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise CompareError(f"{dup[0]} is both a mode and a variant of this comparison; give the variant another name.")
  runs = []
  for entry in entries:
    configured = apply_overrides(base, entry)
    for seed in seeds:
      c = copy.deepcopy(configured)
      c.seed = int(configured.seed) + seed
      c.data.seed = int(configured.data.seed) + seed
      if seed:  # data.seed keys the prepared shards
        c.data.prepared_dir = storage.join(workdir, "shared", f"prepared_s{seed}")
      name = f"{entry.name}_s{seed}"
      runs.append(RunSpec(name=name, label=entry.name, mode=entry.mode, seed=seed,
                          workdir=storage.join(workdir, name), cfg=c))
  return Plan(workdir=workdir, shared_dir=storage.join(workdir, "shared"), base=base, modes=names,
              seeds=list(seeds), runs=runs, variants=[e for e in entries if e.overrides or e.name != e.mode])


def check_plan(plan: Plan, num_devices: int) -> None:
  """ConfigError / CompareError, before any work, for runs that cannot work."""
  from ddk_jax.data.config import domain_specs
  from ddk_jax.settings import Settings
  for run in plan.runs:
    Settings.from_config(run.cfg, num_devices)
  if any(plan.seeds):
    held = [s.name for s in domain_specs(plan.base.data) if s.holds_out_validation]
    if held:
      other = next(s for s in plan.seeds if s)
      raise CompareError(
          f"--seeds={','.join(map(str, plan.seeds))}: domain{'s' if len(held) > 1 else ''} {', '.join(held)} hold"
          f"{'' if len(held) > 1 else 's'} out validation documents chosen by data.seed, so seed {other} would "
          "validate on documents the other runs and the shared models trained on; give every domain validation "
          "files (data.domains[i].validation) or compare --seeds=0 only.")


# ---- several processes: decisions made by process 0 ------------------------------------------------


def _agree(value: Any) -> Any:
  """Process 0's JSON-able `value` on every process (files it reads may be on its disk only)."""
  from ddk_jax import multihost
  return multihost.broadcast_json(value)


def _is_main() -> bool:
  import jax
  return jax.process_index() == 0


def _read_json(path: str) -> dict | None:
  try:
    return json.loads(storage.read_text(path)) if storage.exists(path) else None
  except (OSError, ValueError):
    return None


# ---- training ---------------------------------------------------------------------------------------


def prepare_shared(plan: Plan) -> str:
  """Pre-trains the shared teacher / student base when the config asks for it (once, with the
  config's own seed); "ready" or "preempted"."""
  from ddk_jax import bootstrap
  cfg = copy.deepcopy(plan.base)
  cfg.mode = "kd" if any(ddk.uses_teacher(r.mode) for r in plan.runs) else "cpt"
  _log.info("compare: shared models in %s", plan.shared_dir)
  _, status = bootstrap.prepare_models(cfg, plan.shared_dir)
  return status


def finished(run: RunSpec) -> bool:
  """Whether `run` finished at its config's step count (process 0 decides)."""
  from ddk_jax import checkpointing
  done = False
  if _is_main():
    summary = _read_json(storage.join(run.workdir, "summary.json")) or {}
    steps = int(run.cfg.steps)
    done = (summary.get("status") == "done" and summary.get("step") == steps
            and checkpointing.latest_good_step(run.workdir) == steps)
  return bool(_agree(done))


def check_finished_config(run: RunSpec) -> None:
  """CompareError when a finished run was trained with settings other than `run.cfg`'s (it would
  be skipped and its numbers reported for another experiment)."""
  from ddk_jax import checkpointing, resume_policy, run_setup
  resolved = copy.deepcopy(run.cfg)  # as bootstrap.prepare_models resolves it (model paths are absolute here)
  if not resolved.data.tokenizer and resolved.student.source == "hf":
    resolved.data.tokenizer = resolved.student.path
  reader = checkpointing.open_reader(run.workdir)
  try:
    saved = checkpointing.restore_meta(reader, int(run.cfg.steps))["config"]
  finally:
    reader.close()
  changed = resume_policy.config_changes(saved, run_setup.resolved_config_dict(resolved))
  if changed:
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    raise CompareError(f"{run.workdir} holds a finished run with other settings ({shown}); pass another --workdir "
                       "or delete that run directory.")


def finished_runs(plan: Plan) -> set[str]:
  """The runs that finished with the same settings (skipped); CompareError for one that
  finished with other settings."""
  done = set()
  for run in plan.runs:
    if finished(run):
      check_finished_config(run)
      done.add(run.name)
  return done


def train_run(run: RunSpec, index: int, total: int, *, done: bool) -> str:
  """Trains (or resumes, or skips when `done`) one run; "done", "skipped" or "preempted"."""
  from ddk_jax import trainer
  where = f"compare [{index}/{total}] {run.label} seed {run.seed}"
  if done:
    _log.info("%s: skipping training: finished at step %d (%s)", where, int(run.cfg.steps), run.workdir)
    return "skipped"
  _log.info("%s: training %d steps -> %s", where, int(run.cfg.steps), run.workdir)
  t = time.time()
  summary = trainer.train(run.cfg, run.workdir)
  if summary["status"] != "done":
    return summary["status"]
  _log.info("%s: trained in %.0f s", where, time.time() - t)
  return "done"


# ---- evaluation -------------------------------------------------------------------------------------


def _eval_key(plan: Plan, run: RunSpec, tasks: Sequence[str], limit: int, num_fewshot: int) -> str:
  """What an evaluation of `run` depends on besides its checkpoint: a cached one is reused when equal."""
  import jax
  b = plan.base
  blob = {"data": json.loads(b.data.to_json_best_effort()), "eval_batch_size": int(b.ddk.eval_batch_size),
          "loss": [str(b.loss.impl), int(b.loss.chunk_size)], "mesh": json.loads(b.mesh.to_json_best_effort()),
          "step": int(run.cfg.steps), "processes": jax.process_count(), "tasks": list(tasks), "limit": int(limit),
          "num_fewshot": int(num_fewshot)}
  return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_run(plan: Plan, run: RunSpec, index: int, total: int, *, teacher: bool, tasks: Sequence[str],
                 limit: int, num_fewshot: int, fresh: bool = False) -> dict:
  """`evaluate_checkpoint` of the run's last step on the whole validation split (the base
  config's data: the same rows for every run), written to `<run>/eval/step_<N>.json`; reused
  when that file is there for the same step and settings, unless `fresh` (the run just trained)."""
  where = f"compare [{index}/{total}] {run.label} seed {run.seed}"
  steps = int(run.cfg.steps)
  path = evaluate.default_output(run.workdir, steps)
  key = _eval_key(plan, run, tasks, limit, num_fewshot)
  cached = None
  if _is_main() and not fresh:
    cached = _read_json(path)
    if cached is not None and (cached.get("compare_key") != key or (teacher and not cached.get("teacher"))):
      cached = None
  cached = _agree(cached)
  if cached is not None:
    _log.info("%s: skipping evaluation: %s is up to date", where, path)
    return cached
  what = "the whole validation split" + (" and the teacher" if teacher else "") + (
      f", downstream tasks {','.join(tasks)}" if tasks else "")
  _log.info("%s: evaluating on %s", where, what)
  t = time.time()
  result = evaluate.evaluate_checkpoint(plan.base, workdir=run.workdir, step=steps, teacher=teacher,
                                        tasks=list(tasks) or None, limit=limit, num_fewshot=num_fewshot)
  result["compare_key"] = key
  if _is_main():
    evaluate.write_result(result, path)
  acc = evaluate.mean_accuracy(result.get("downstream") or {})
  _log.info("%s: evaluated in %.0f s: mean perplexity %.2f%s", where, time.time() - t, result["mean"]["student_ppl"],
            "" if acc is None else f", mean accuracy {acc:.4f}")
  return result


# ---- the comparison ---------------------------------------------------------------------------------


def _stat(values: Sequence[float | None]) -> dict | None:
  """{"mean", "sd" (sample standard deviation over seeds; None for one seed), "n"}."""
  vals = [float(v) for v in values if v is not None and math.isfinite(v)]
  if not vals:
    return None
  sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
  return {"mean": float(np.mean(vals)), "sd": sd, "n": len(vals)}


def _mean_stderr(results: Mapping[str, Mapping[str, float]] | None) -> float | None:
  """The standard error of the mean accuracy over tasks, from lm-eval's per-task `acc_stderr`
  (tasks independent): sqrt(sum se^2) / tasks."""
  if not results or not all("acc" in m and "acc_stderr" in m for m in results.values()):
    return None
  return float(math.sqrt(sum(m["acc_stderr"] ** 2 for m in results.values())) / len(results))


def _worst_ratio(result: Mapping, teacher_ce: Mapping[str, float] | None) -> dict | None:
  if not teacher_ce:
    return None
  ratios = {d: v["student_ce"] / teacher_ce[d] for d, v in result["domains"].items()}
  worst = max(ratios, key=ratios.get)
  return {"domain": worst, "ratio": float(ratios[worst])}


def summarize(plan: Plan, results: Mapping[str, dict], walls: Mapping[str, float | None], *,
              config_file: str | None = None) -> dict:
  """comparison.json: per run and per mode (over seeds), from the runs' evaluation results."""
  first = results[plan.runs[0].name]
  names = list(first["domains"])
  teacher_src = next((r for r in results.values() if r.get("teacher")), None)
  teacher = None
  if teacher_src is not None:
    ce = {d: teacher_src["domains"][d]["teacher_ce"] for d in names}
    teacher = {"ce": ce, "ppl": {d: teacher_src["domains"][d]["teacher_ppl"] for d in names},
               "mean_ppl": teacher_src["mean"]["teacher_ppl"], "source": teacher_src["teacher"]}
  runs = []
  for run in plan.runs:
    r = results[run.name]
    down = r.get("downstream")
    runs.append({
        "name": run.name, "mode": run.label, "train_mode": run.mode,
        "overrides": {k: v for k, v in next((e.overrides for e in plan.variants if e.name == run.label), ())},
        "seed": run.seed, "workdir": run.workdir, "step": r["student"]["step"],
        "eval_file": evaluate.default_output(run.workdir, int(run.cfg.steps)),
        "ce": {d: r["domains"][d]["student_ce"] for d in names},
        "ppl": {d: r["domains"][d]["student_ppl"] for d in names},
        "mean_ce": r["mean"]["student_ce"], "mean_ppl": r["mean"]["student_ppl"],
        "worst_ppl": max(r["domains"][d]["student_ppl"] for d in names),
        "worst_ratio": _worst_ratio(r, teacher["ce"] if teacher else None),
        "downstream": down, "mean_acc": evaluate.mean_accuracy(down) if down else None,
        "mean_acc_stderr": _mean_stderr(down),
        "wall_seconds": walls.get(run.name)})
  by_mode = {}
  for mode in plan.modes:
    rs = [r for r in runs if r["mode"] == mode]
    tasks = list(rs[0]["downstream"] or {})
    worst = [r["worst_ratio"] for r in rs if r["worst_ratio"] is not None]
    worst_stat = _stat([w["ratio"] for w in worst])
    by_mode[mode] = {
        "seeds": [r["seed"] for r in rs],
        "ppl": {d: _stat([r["ppl"][d] for r in rs]) for d in names},
        "mean_ppl": _stat([r["mean_ppl"] for r in rs]),
        "worst_ppl": _stat([r["worst_ppl"] for r in rs]),
        "mean_ce": _stat([r["mean_ce"] for r in rs]),
        "worst_ratio": None if worst_stat is None else dict(worst_stat, domains=[w["domain"] for w in worst]),
        "acc": {t: _stat([(r["downstream"] or {}).get(t, {}).get("acc") for r in rs]) for t in tasks},
        "mean_acc": _stat([r["mean_acc"] for r in rs]),
    }
    if len(rs) == 1 and by_mode[mode]["mean_acc"] is not None and rs[0]["mean_acc_stderr"] is not None:
      by_mode[mode]["mean_acc"]["se"] = rs[0]["mean_acc_stderr"]  # one seed: the documents' sampling error
  cfg = plan.base
  seq_len, batch, steps = int(cfg.data.seq_len), int(cfg.global_batch_size), int(cfg.steps)
  weights = [float(d.get("weight", 1.0)) for d in cfg.data.domains]
  comparison = {
      "format_version": FORMAT_VERSION,
      "config_file": config_file, "workdir": plan.workdir, "modes": plan.modes, "seeds": plan.seeds,
      "seed_policy": SEED_POLICY,
      "budget": {"steps": steps, "global_batch_size": batch, "seq_len": seq_len, "tokens": steps * batch * seq_len},
      "shared": {w: {"source": str(cfg[w].source), "path": str(cfg[w].path) or None} for w in ("teacher", "student")},
      "domains": names,
      "equal_domain_weights": len(set(weights)) == 1,  # then kd's static mixture is ddk_equal_sampling's
      "validation": {"whole_split": first["validation"]["whole_split"], "seq_len": first["validation"]["seq_len"],
                     "rows": {d: first["domains"][d]["rows"] for d in names},
                     "rows_key": first["validation"]["rows_key"]},
      "downstream_settings": first.get("downstream_settings"),
      "teacher": teacher,
      "runs": runs,
      "by_mode": by_mode,
  }
  comparison["claim"] = paper_claim(comparison)
  return comparison


def _order(by_mode: Mapping, key: str, *, reverse: bool) -> list[str]:
  have = [m for m in by_mode if by_mode[m].get(key) is not None]
  return sorted(have, key=lambda m: by_mode[m][key]["mean"], reverse=reverse)


def _chain(by_mode: Mapping, key: str, *, higher_better: bool) -> dict:
  """Whether ddk < kd < cpt (lower better) or ddk > kd > cpt (higher better) in `key`'s means."""
  missing = [m for m in PAPER_ORDER if m not in by_mode or by_mode[m].get(key) is None]
  out: dict[str, Any] = {"expected": list(PAPER_ORDER), "order": _order(by_mode, key, reverse=higher_better),
                         "holds": None, "pairs": []}
  if missing:
    out["missing"] = missing
    return out
  holds = True
  for better, worse in zip(PAPER_ORDER, PAPER_ORDER[1:]):
    a, b = by_mode[better][key], by_mode[worse][key]
    gap = (a["mean"] - b["mean"]) if higher_better else (b["mean"] - a["mean"])
    # With several seeds: the two modes' seed standard deviations added; with one, the two
    # accuracies' standard errors over the documents added (perplexity: not measured).
    spread, kind = None, None
    if a["sd"] is not None and b["sd"] is not None:
      spread, kind = a["sd"] + b["sd"], "sd"
    elif a.get("se") is not None and b.get("se") is not None:
      spread, kind = a["se"] + b["se"], "se"
    out["pairs"].append({"better": better, "worse": worse, "gap": gap, "holds": gap > 0,
                         "beyond_spread": None if spread is None else abs(gap) > spread, "spread": spread,
                         "spread_kind": kind})
    holds = holds and gap > 0
  out["holds"] = holds
  return out


def _identical_modes(runs: Sequence[Mapping]) -> list[list[str]]:
  """Groups of modes whose runs gave the same numbers, seed by seed (every domain's CE and
  every task's metrics): modes that trained the same way in this configuration."""
  per_mode: dict[str, list] = {}
  for r in runs:
    per_mode.setdefault(r["mode"], []).append((r["seed"], r["ce"], r.get("downstream")))
  groups: list[list[str]] = []
  for mode, results in per_mode.items():
    for g in groups:
      if per_mode[g[0]] == results:
        g.append(mode)
        break
    else:
      groups.append([mode])
  return [g for g in groups if len(g) > 1]


# What `versus` judges: key, higher is better, name, format.
VERSUS_KEYS = (("mean_ppl", False, "mean perplexity", ".2f"), ("worst_ppl", False, "worst-domain perplexity", ".2f"),
               ("mean_ce", False, "mean CE", ".4f"), ("worst_ratio", False, "worst-domain CE ratio", ".3f"),
               ("mean_acc", True, "mean accuracy", ".4f"))
VERSUS_REFERENCES = ("kd", "ddk")


def versus(by_mode: Mapping) -> dict:
  """Every mode or variant against kd and ddk (where compared): per key the gap (positive: better
  than the reference), the two seed standard deviations added, and whether the gap exceeds them
  (None with one seed)."""
  out: dict[str, dict] = {}
  for ref in VERSUS_REFERENCES:
    if ref not in by_mode:
      continue
    out[ref] = {}
    for label, m in by_mode.items():
      if label == ref:
        continue
      entry = {}
      for key, higher, _, _ in VERSUS_KEYS:
        a, b = m.get(key), by_mode[ref].get(key)
        if a is None or b is None:
          continue
        gap = (a["mean"] - b["mean"]) if higher else (b["mean"] - a["mean"])
        spread = a["sd"] + b["sd"] if a["sd"] is not None and b["sd"] is not None else None
        entry[key] = {"gap": gap, "spread": spread, "beyond_spread": None if spread is None else abs(gap) > spread}
      out[ref][label] = entry
  return out


def paper_claim(comparison: Mapping) -> dict:
  """The paper's orderings checked against these numbers: mean perplexity ddk < kd < cpt,
  downstream accuracy ddk > kd > cpt, and where the ablations fall relative to ddk."""
  by_mode = comparison["by_mode"]
  claim = {"perplexity": _chain(by_mode, "mean_ppl", higher_better=False),
           "ce": _chain(by_mode, "mean_ce", higher_better=False),
           "accuracy": _chain(by_mode, "mean_acc", higher_better=True),
           "worst_ratio_order": _order(by_mode, "worst_ratio", reverse=False), "ablations": {},
           "identical": _identical_modes(comparison.get("runs", [])), "versus": versus(by_mode)}
  for ab in ABLATIONS:
    if ab not in by_mode or "ddk" not in by_mode:
      continue
    entry = {}
    for key, higher in (("mean_ppl", False), ("mean_ce", False), ("mean_acc", True), ("worst_ratio", False)):
      a, d = by_mode[ab].get(key), by_mode["ddk"].get(key)
      if a is None or d is None:
        continue
      order = _order(by_mode, key, reverse=higher)
      worse = a["mean"] < d["mean"] if higher else a["mean"] > d["mean"]
      entry[key] = {"value": a["mean"], "ddk": d["mean"], "rank": order.index(ab) + 1, "of": len(order),
                    "worse_than_ddk": bool(worse)}
    claim["ablations"][ab] = entry
  return claim


# ---- markdown and plots -----------------------------------------------------------------------------


def _fmt(stat: Mapping | None, fmt: str = ".2f") -> str:
  if stat is None:
    return "-"
  text = format(stat["mean"], fmt)
  return text + (f" ± {format(stat['sd'], fmt)}" if stat.get("sd") is not None else "")


def _claim_lines(comparison: Mapping) -> list[str]:
  claim, by_mode = comparison["claim"], comparison["by_mode"]
  n_seeds = len(comparison["seeds"])
  lines = []

  def chain_text(c: Mapping, key: str, what: str, sign: str, fmt: str, paper: str = "paper") -> str:
    order = f" {sign} ".join(f"{m} {by_mode[m][key]['mean']:{fmt}}" for m in c["order"])
    head = f"**{what}** ({paper}: ddk {sign} kd {sign} cpt). Measured, best first: {order}."
    if c["holds"] is None:
      return head + f" Not checked: {', '.join(c['missing'])} not compared (add to --modes)."
    verdict = " The paper's order holds." if c["holds"] else " The paper's order does not hold."
    notes = []
    for p in c["pairs"]:
      rel = "ahead of" if p["holds"] else "behind"
      spread = ""
      if p["beyond_spread"] is not None:
        what = ("the two modes' seed standard deviations" if p["spread_kind"] == "sd"
                else "the two accuracies' standard errors over the documents")
        spread = f", {'more than' if p['beyond_spread'] else 'within'} {what} added ({p['spread']:{fmt}})"
      notes.append(f"{p['better']} is {rel} {p['worse']} by {abs(p['gap']):{fmt}}{spread}")
    text = head + verdict + " " + "; ".join(notes) + "."
    if n_seeds == 1:
      text += " One seed: the seed-to-seed spread is not measured."
    if c["holds"] is not None and any(p["beyond_spread"] is False for p in c["pairs"]):
      text += " A difference within the spread is not evidence either way."
    return text

  lines.append("- " + chain_text(claim["perplexity"], "mean_ppl", "Mean validation perplexity", "<", ".2f"))
  if claim.get("ce"):
    lines.append("- " + chain_text(claim["ce"], "mean_ce", "Mean validation CE", "<", ".4f", "the paper's order")
                 + " (The mean CE is the log of the perplexities' geometric mean: every domain counts by its "
                 "relative change, where the mean perplexity is dominated by the domains of highest perplexity.)")
  if comparison.get("downstream_settings"):
    lines.append("- " + chain_text(claim["accuracy"], "mean_acc", "Mean downstream accuracy", ">", ".4f"))
  else:
    lines.append("- **Mean downstream accuracy** (paper: ddk > kd > cpt): not measured (pass --tasks).")
  if claim["worst_ratio_order"]:
    order = " < ".join(f"{m} {by_mode[m]['worst_ratio']['mean']:.3f}" for m in claim["worst_ratio_order"])
    lines.append(f"- **Worst-domain student/teacher CE ratio** (what DDK's sampling aims to lower), best first: "
                 f"{order}.")
  for group in claim.get("identical", []):
    why = ""
    if set(group) == {"kd", "ddk_equal_sampling"} and comparison.get("equal_domain_weights"):
      why = (": the config gives every domain the same weight, so kd's static mixture is the uniform one "
             "ddk_equal_sampling keeps")
    lines.append(f"- {' and '.join(group)} gave identical numbers on every domain and task; they trained the same "
                 f"way here{why}.")
  names = {"mean_ppl": ("mean perplexity", ".2f"), "mean_ce": ("mean CE", ".4f"), "mean_acc": ("mean accuracy", ".4f"),
           "worst_ratio": ("worst-domain CE ratio", ".3f")}
  for ab, entry in claim["ablations"].items():
    parts = []
    for key, e in entry.items():
      what, fmt = names[key]
      side = "worse than" if e["worse_than_ddk"] else "better than or equal to"
      parts.append(f"{what} {e['value']:{fmt}} vs ddk {e['ddk']:{fmt}}: {side} ddk, rank {e['rank']} of {e['of']}")
    lines.append(f"- **Ablation {ab}** (paper: worse than ddk): " + "; ".join(parts) + ".")
  return lines


def _versus_lines(comparison: Mapping) -> list[str]:
  """One table per reference (kd, ddk): every other mode's or variant's gap to it."""
  table = comparison["claim"].get("versus") or {}
  lines = []
  for ref, rows in table.items():
    if not rows:
      continue
    keys = [k for k in VERSUS_KEYS if any(k[0] in e for e in rows.values())]
    lines += [f"## Against {ref}", "",
              f"Gap to {ref}, positive where the row is better (lower perplexity, CE and ratio; higher accuracy); "
              "in brackets the two seed standard deviations added; **bold** where the gap exceeds them.", "",
              "| mode | " + " | ".join(k[2] for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for label, entry in rows.items():
      cells = []
      for key, _, _, fmt in keys:
        e = entry.get(key)
        if e is None:
          cells.append("-")
          continue
        cell = f"{e['gap']:+{fmt}}"
        if e["spread"] is not None:
          cell = (f"**{cell}**" if e["beyond_spread"] else cell) + f" ({e['spread']:{fmt}})"
        cells.append(cell)
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
  return lines


def write_markdown(comparison: Mapping, path: str, plots: Sequence[str]) -> str:
  c = comparison
  names, by_mode, teacher = c["domains"], c["by_mode"], c["teacher"]
  b = c["budget"]
  n = len(c["seeds"])
  spread = ("mean ± sample standard deviation over the seeds" if n > 1 else "one seed")
  shared = "; ".join(f"{w}: {s['source']}" + (f" {s['path']}" if s["path"] else "") for w, s in c["shared"].items())
  text = [f"# Comparison: {', '.join(c['modes'])}", "",
          f"Config {c['config_file'] or '(in-process)'}; seeds {', '.join(map(str, c['seeds']))} ({c['seed_policy']}).",
          f"Every run: {b['steps']} steps of {b['global_batch_size']} x {b['seq_len']} tokens ({b['tokens']:,} "
          f"tokens), from the same models ({shared}).",
          f"Scored on the whole validation split ({', '.join(f'{d} {k}' for d, k in c['validation']['rows'].items())} "
          f"rows of {c['validation']['seq_len']} tokens); numbers are {spread}.", "",
          "## Validation perplexity per domain (lower is better)", "",
          "| mode | " + " | ".join(names) + " | mean | worst | mean CE | worst student/teacher CE ratio |",
          "|---|" + "---:|" * (len(names) + 4)]
  if teacher:
    text.append("| teacher | " + " | ".join(f"{teacher['ppl'][d]:.2f}" for d in names)
                + f" | {teacher['mean_ppl']:.2f} | {max(teacher['ppl'].values()):.2f} | "
                f"{np.mean(list(teacher['ce'].values())):.4f} | |")
  for mode, m in by_mode.items():
    worst = "-"
    if m["worst_ratio"] is not None:
      domains = sorted(set(m["worst_ratio"]["domains"]))
      worst = f"{_fmt(m['worst_ratio'], '.3f')} ({', '.join(domains)})"
    text.append(f"| {mode} | " + " | ".join(_fmt(m["ppl"][d]) for d in names) + f" | {_fmt(m['mean_ppl'])} | "
                f"{_fmt(m.get('worst_ppl'))} | {_fmt(m['mean_ce'], '.4f')} | {worst} |")
  text += ["", "mean: the unweighted mean of the domains' perplexities; worst: the highest domain perplexity of "
           "each run; mean CE: the mean of the domains' CEs (nats per token). Ratio: the largest per-domain "
           "student CE / teacher CE (DDK's lS / lT), with its domain.", ""]
  variants = [r for r in c["runs"] if r.get("overrides") or r.get("train_mode", r["mode"]) != r["mode"]]
  if variants:
    seen = {}
    for r in variants:
      seen.setdefault(r["mode"], (r["train_mode"], r["overrides"]))
    text += ["Variants: " + "; ".join(
        f"{name} = {mode}" + "".join(f", {k}={v!r}" for k, v in over.items()) for name, (mode, over) in seen.items())
        + ".", ""]
  settings = c.get("downstream_settings")
  if settings:
    tasks = list(next(iter(by_mode.values()))["acc"])
    limit = settings["limit"]
    text += ["## Downstream accuracy (higher is better)", "",
             f"Tasks {', '.join(settings['tasks'])}: {'every document' if not limit else f'at most {limit} documents'} "
             f"per task, {settings['num_fewshot']}-shot; acc (multiple choice: the highest log-likelihood choice).",
             "", "| mode | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for mode, m in by_mode.items():
      text.append(f"| {mode} | " + " | ".join(_fmt(m["acc"].get(t), ".4f") for t in tasks)
                  + f" | {_fmt(m['mean_acc'], '.4f')} |")
    text.append("")
  text += ["## The paper's claim", "", *_claim_lines(c), ""]
  text += _versus_lines(c)
  if plots:
    text += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  text += ["## Runs", "", "| run | mode | seed | steps | train wall time (s) | mean ppl | evaluation |",
           "|---|---|---:|---:|---:|---:|---|"]
  for r in c["runs"]:
    wall = "-" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
    where = r["eval_file"] if storage.is_remote(r["eval_file"]) else os.path.relpath(r["eval_file"], c["workdir"])
    text.append(f"| {r['name']} | {r['mode']} | {r['seed']} | {r['step']} | {wall} | {r['mean_ppl']:.2f} | {where} |")
  storage.write_text(path, "\n".join(text) + "\n")
  return path


def _metrics_rows(workdir: str, kind: str) -> list[dict]:
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return []
  rows = []
  for line in storage.read_text(path).splitlines():
    if line.strip():
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if row.get("kind") == kind:
        rows.append(row)
  return rows


def plot_weights(comparison: Mapping, path: str) -> bool:
  """Domain weights over the run, one panel per mode (its first seed's run), from metrics.jsonl."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names, modes = comparison["domains"], comparison["modes"]
  steps = comparison["budget"]["steps"]
  series = {}
  for mode in modes:
    run = next(r for r in comparison["runs"] if r["mode"] == mode)
    rows = _metrics_rows(run["workdir"], "weights")
    if rows:
      series[mode] = (run["seed"], rows)
  if not series:
    return False
  fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series) + 0.8, 3.4), sharey=True, squeeze=False)
  for ax, (mode, (seed, rows)) in zip(axes[0], series.items()):
    x = [r["step"] for r in rows] + [steps]
    for n in names:
      y = [r.get(f"weights/{n}", float("nan")) for r in rows]
      ax.step(x, y + y[-1:], where="post", label=n)
    ax.set_title(f"{mode} (seed {seed})", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("sampling weight")
  axes[0][-1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  with storage.open(path, "wb") as f:
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)
  return True


def plot_perplexity(comparison: Mapping, path: str) -> bool:
  """Per-domain validation perplexity per mode as grouped bars (error bars: seed standard
  deviation), the teacher as a black mark per domain; log scale when the values span 10x."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names, by_mode, teacher = comparison["domains"], comparison["by_mode"], comparison["teacher"]
  modes = list(by_mode)
  width = 0.8 / len(modes)
  fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4))
  x = np.arange(len(names))
  for k, mode in enumerate(modes):
    stats = [by_mode[mode]["ppl"][d] for d in names]
    means = [s["mean"] if s else np.nan for s in stats]
    sds = [s["sd"] if s and s["sd"] is not None else 0.0 for s in stats]
    ax.bar(x - 0.4 + width * (k + 0.5), means, width, yerr=sds if any(sds) else None, capsize=2, label=mode)
  if teacher:
    ax.scatter(x, [teacher["ppl"][d] for d in names], marker="_", s=900, linewidths=2, color="black", zorder=3,
               label="teacher")
  ax.set_xticks(x)
  ax.set_xticklabels(names)
  values = [s["mean"] for m in modes for s in by_mode[m]["ppl"].values() if s] + (
      list(teacher["ppl"].values()) if teacher else [])
  values = [v for v in values if v and math.isfinite(v)]
  if values and max(values) > 10 * min(values):
    ax.set_yscale("log")
  ax.set_ylabel("validation perplexity")
  ax.set_title("Per-domain validation perplexity (lower is better)")
  ax.legend(fontsize=7, ncol=2, markerscale=0.3)
  ax.grid(alpha=0.3, axis="y", which="both")
  fig.tight_layout()
  with storage.open(path, "wb") as f:
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)
  return True


def write_outputs(comparison: Mapping, workdir: str) -> tuple[str, str]:
  """comparison.json, comparison.md and the plots in `workdir` (process 0)."""
  plots = []
  if plot_perplexity(comparison, storage.join(workdir, "comparison_perplexity.png")):
    plots.append("comparison_perplexity.png")
  if plot_weights(comparison, storage.join(workdir, "comparison_weights.png")):
    plots.append("comparison_weights.png")
  comparison = dict(comparison, plots=plots)
  json_path = storage.join(workdir, "comparison.json")
  storage.write_bytes_atomic(json_path, (json.dumps(comparison, indent=1) + "\n").encode())
  return json_path, write_markdown(comparison, storage.join(workdir, "comparison.md"), plots)


def format_table(comparison: Mapping) -> str:
  """The per-mode summary as a text table: mean perplexity, worst ratio, mean accuracy."""
  headers = ["mode", "mean ppl", "mean CE", "worst CE ratio", "mean acc"]
  body = [[m, _fmt(s["mean_ppl"]), _fmt(s["mean_ce"], ".4f"), _fmt(s["worst_ratio"], ".3f"), _fmt(s["mean_acc"], ".4f")]
          for m, s in comparison["by_mode"].items()]
  widths = [max(len(h), *(len(r[k]) for r in body)) for k, h in enumerate(headers)]

  def line(cells):
    return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

  return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


# ---- the whole comparison ---------------------------------------------------------------------------


def compare(cfg: Any, workdir: str, modes: Sequence[str | Variant], seeds: Sequence[int] = (0,), *,
            tasks: str | Sequence[str] | None = None, limit: int = 0, num_fewshot: int = 0,
            config_file: str | None = None) -> dict:
  """Trains, evaluates and compares every (mode or variant, seed); returns comparison.json's dict, or
  {"status": "preempted"} after SIGTERM (rerun to resume).  Every process of a multi-host job
  calls it; process 0 writes the outputs.  Raises CompareError, ConfigError, TrainingError,
  EvaluationError (and the trainer's NonFiniteError / CheckpointError)."""
  import jax
  modes, seeds = list(modes), list(seeds)
  task_names = evaluate.check_tasks(tasks, limit=limit, num_fewshot=num_fewshot)
  plan = make_plan(cfg, workdir, modes, seeds)
  check_plan(plan, jax.device_count())
  done = finished_runs(plan)
  b = plan.base
  _log.info("compare: %d mode%s x %d seed%s = %d runs of %d steps x %d x %d tokens in %s", len(modes),
            "s" * (len(modes) > 1), len(seeds), "s" * (len(seeds) > 1), len(plan.runs), int(b.steps),
            int(b.global_batch_size), int(b.data.seq_len), plan.workdir)
  storage.makedirs(plan.workdir)
  if prepare_shared(plan) == "preempted":
    return {"status": "preempted"}
  teacher_run = next((r.name for r in plan.runs if ddk.uses_teacher(r.mode)), None)
  results, walls = {}, {}
  total = len(plan.runs)
  for i, run in enumerate(plan.runs, 1):
    status = train_run(run, i, total, done=run.name in done)
    if status == "preempted":
      return {"status": "preempted"}
    results[run.name] = evaluate_run(plan, run, i, total, teacher=run.name == teacher_run, tasks=task_names,
                                     limit=limit, num_fewshot=num_fewshot, fresh=status == "done")
    summary = _agree(_read_json(storage.join(run.workdir, "summary.json")) if _is_main() else None) or {}
    walls[run.name] = summary.get("wall_seconds")
  comparison = summarize(plan, results, walls, config_file=config_file)
  if _is_main():
    json_path, md_path = write_outputs(comparison, plan.workdir)
    comparison["outputs"] = {"json": json_path, "markdown": md_path}
  return comparison


# ---- command line -----------------------------------------------------------------------------------


def _define_flags() -> dict:
  from absl import flags
  from ml_collections import config_flags
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "Experiment config file (configs/*.py) with get_config(); every run uses it with its "
          "mode and seed. Override any key with --config.<key>=<value> (docs/config.md).", lock_config=True),
      "workdir": flags.DEFINE_string("workdir", None, "Directory of the comparison: <mode>_s<seed>/ runs, shared/ "
                                     "models, comparison.md and comparison.json."),
      "modes": flags.DEFINE_string("modes", None, f"Comma-separated modes to compare (default: {DEFAULT_MODES}; "
                                   "with --variant and no --modes, none)."),
      "variant": flags.DEFINE_multi_string("variant", [], "A named variant to compare, repeatable: 'NAME: MODE, "
                                           "KEY=VALUE, ...' (config keys, Python literal values), e.g. "
                                           "'ddk_excess: ddk, ddk.discrepancy=\"excess\"'."),
      "seeds": flags.DEFINE_string("seeds", "0", "Comma-separated seed offsets: seed S adds S to the config's seed "
                                   "and data.seed (0: the config as it is)."),
      "tasks": flags.DEFINE_string("tasks", None, "Downstream tasks to run on every student, comma-separated "
                                   "(ddk_local, ddk_<domain>, lm-eval's own; docs/downstream.md)."),
      "limit": flags.DEFINE_integer("limit", 0, "With --tasks: at most this many documents per task (0: all)."),
      "num_fewshot": flags.DEFINE_integer("num_fewshot", 0, "With --tasks: few-shot examples before each question."),
  }


def _main(argv, f: dict) -> None:
  from ddk_jax import cli

  cfg = cli.require_config(argv, f["config"].value, "the experiment every mode runs")
  workdir = f["workdir"].value
  if not workdir:
    raise cli.UsageError("--workdir is required: the directory of the comparison (its runs, shared models and "
                         "comparison.md), e.g. --workdir=runs/compare.")
  tasks, limit, num_fewshot = f["tasks"].value, f["limit"].value, f["num_fewshot"].value
  try:  # what can be checked before JAX starts
    variants = parse_variants(f["variant"].value)
    given = f["modes"].value
    if given is None:
      modes = [] if variants else parse_modes(DEFAULT_MODES)
    else:
      modes = parse_modes(given)
    modes = [*modes, *variants]
    seeds = parse_seeds(f["seeds"].value)
    if not evaluate.split_tasks(tasks) and (limit or num_fewshot):
      given = "--limit" if limit else "--num_fewshot"
      raise CompareError(f"{given} applies to downstream tasks; pass --tasks=... (e.g. --tasks=ddk_local) or leave "
                         f"{given} out.")
    tasks = evaluate.check_tasks(tasks, limit=limit, num_fewshot=num_fewshot)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  from ddk_jax import multihost
  cli.setup_logging(logging.WARNING)
  multihost.initialize_or_exit()
  cli.setup_logging()
  import jax
  from absl import flags
  from ddk_jax import checkpointing, trainer
  from ddk_jax.errors import TrainingError

  evaluate._enable_compilation_cache(cfg.compilation_cache_dir)  # pylint: disable=protected-access
  config_file = os.path.abspath(flags.FLAGS["config"].config_filename)
  try:
    result = compare(cfg, workdir, modes, seeds, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                     config_file=config_file)
  except trainer.NonFiniteError as e:
    _log.error("%s", e)
    raise SystemExit(EXIT_NON_FINITE) from None
  except checkpointing.CheckpointError as e:
    _log.error("%s", e)
    raise SystemExit(EXIT_CHECKPOINT) from None
  except (ValueError, OSError, TrainingError) as e:
    text = str(e).strip()
    cli.fail(text.splitlines()[0] if text else type(e).__name__)
  if result.get("status") == "preempted":
    _log.warning("compare: stopped by SIGTERM; rerun the same command to resume.")
    raise SystemExit(EXIT_PREEMPTED)
  if jax.process_index() == 0:
    print(format_table(result))
    print(f"wrote {result['outputs']['markdown']} and {result['outputs']['json']}")


def run() -> None:
  from ddk_jax import cli
  f = _define_flags()
  cli.run(lambda argv: _main(argv, f), prog="ddk_jax.compare")


if __name__ == "__main__":
  run()
