"""`python -m ddk_jax.evaluate` on a finished tiny run, and the trainer's final evaluation on the
whole validation split when the controller scores a subset (ddk.eval_max_rows).

The tiny runs here cap the controller's rows at 1 per domain, so the whole split (4-11 rows per
domain) and the capped rows differ: the evaluation must give the trainer's final numbers on the
first and its controller's numbers on the second.

Downstream tasks (`--tasks`, and `eval.tasks` in training) run one local task (ddk_math, from a
small demo corpus) on at most 3 documents."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import tiny_run

EVALUATE = "ddk_jax.evaluate"
CAPPED = {"ddk.eval_max_rows": 1, "steps": 3, "ddk.interval": 2, "checkpoint.every": 1}


def _run(module: str, *args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=tiny_run.REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _read(path) -> dict:
  with open(path) as f:
    return json.load(f)


def _rows(workdir: str, kind: str, step: int) -> dict:
  found = [r for r in tiny_run.metrics(workdir) if r["kind"] == kind and r["step"] == step]
  assert len(found) == 1, (kind, step)
  return found[0]


# ---- the command on a run made by `python -m ddk_jax.main` (one device, as the command runs) -------


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate_cli")
  assets = tiny_run.shared_assets(tiny_run.shared_root(tmp_path_factory))
  config = tiny_run.write_config_file(str(root / "tiny.py"), assets, **CAPPED)
  env = tiny_run.env_for(1, cache_dir=str(root / "jax_cache"))
  workdir = str(root / "run")
  p = tiny_run.run(config, workdir, env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  # The compilation cache of these tests, not the config's default one under ~/.cache.
  return {"root": root, "config": f"--config={config}", "cache": "--config.compilation_cache_dir=" + env[
      "JAX_COMPILATION_CACHE_DIR"], "env": env, "workdir": workdir, "summary": _read(os.path.join(workdir,
                                                                                                  "summary.json"))}


@pytest.fixture(scope="module")
def whole_split(cli_env):
  """The default evaluation: latest step, whole split, teacher (mode ddk)."""
  p = _run(EVALUATE, cli_env["config"], cli_env["cache"], f"--workdir={cli_env['workdir']}", env=cli_env["env"])
  assert p.returncode == 0, p.stderr[-3000:]
  path = os.path.join(cli_env["workdir"], "eval", "step_3.json")
  return p, _read(path)


def test_json_holds_the_trainers_final_numbers(cli_env, whole_split):
  _, result = whole_split
  summary = cli_env["summary"]
  names = list(tiny_run.DOMAINS)
  assert list(result["domains"]) == names
  assert result["student"] == {"source": "workdir", "workdir": cli_env["workdir"], "step": 3}
  assert result["teacher"]["source"] == "random" and result["teacher"]["from"] == "run"
  v = result["validation"]
  assert v["whole_split"] and v["max_rows"] == 0 and v["seq_len"] == 32 and v["num_processes"] == 1
  # The same rows as the trainer's final evaluation, which the report says is the whole split.
  assert [result["domains"][n]["rows"] for n in names] == [summary["rows"]["final"]["per_domain"][n] for n in names]
  assert summary["rows"]["controller"]["per_domain"] == {n: 1 for n in names}
  assert all(result["domains"][n]["rows"] > 1 for n in names)
  got = {k: [result["domains"][n][f"{k}_ce"] for n in names] for k in ("student", "teacher")}
  np.testing.assert_allclose(got["student"], summary["student_final"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(got["teacher"], summary["teacher_final"], rtol=0, atol=1e-6)
  for n in names:
    d = result["domains"][n]
    assert d["tokens"] > 0
    assert d["student_ppl"] == pytest.approx(math.exp(d["student_ce"]))
    assert d["teacher_ppl"] == pytest.approx(math.exp(d["teacher_ce"]))
    assert d["ratio"] == pytest.approx(d["student_ce"] / d["teacher_ce"])
  assert result["mean"]["student_ce"] == pytest.approx(np.mean(got["student"]))
  assert result["mean"]["student_ppl"] == pytest.approx(np.mean(np.exp(got["student"])))
  assert result["config_file"].endswith("tiny.py")


def test_table_and_progress_lines(whole_split):
  p, result = whole_split
  out = p.stdout.splitlines()
  assert out[0].startswith("student ") and "whole validation split" in out[0]
  assert out[1].split() == ["domain", "rows", "student", "CE", "teacher", "CE", "lS/lT", "student", "ppl", "teacher",
                            "ppl"]
  for name in tiny_run.DOMAINS:
    d = result["domains"][name]
    row = next(line.split() for line in out if line.startswith(name + " "))
    assert row == [name, str(d["rows"]), f"{d['student_ce']:.4f}", f"{d['teacher_ce']:.4f}", f"{d['ratio']:.4f}",
                   f"{d['student_ppl']:.2f}", f"{d['teacher_ppl']:.2f}"]
  assert any(line.startswith("mean ") for line in out)
  assert out[-1].startswith("wrote ") and "eval/step_3.json" in out[-1]
  for who in ("student", "teacher"):
    for i, name in enumerate(tiny_run.DOMAINS):
      assert f"{who}: domain {i + 1}/3 '{name}': " in p.stderr, p.stderr[-2000:]


def test_max_rows_and_step_give_the_controllers_rows(cli_env, whole_split, tmp_path):
  """--step=2 --max_rows=1: the rows ddk.eval_max_rows=1 picks, so the student's CE is the one the
  controller measured at its update at step 2; --noteacher leaves the teacher out."""
  out = tmp_path / "sub" / "capped.json"
  p = _run(EVALUATE, cli_env["config"], cli_env["cache"], f"--workdir={cli_env['workdir']}", "--step=2",
           "--max_rows=1", "--noteacher", f"--out={out}", env=cli_env["env"])
  assert p.returncode == 0, p.stderr[-3000:]
  result = _read(out)
  assert result["student"]["step"] == 2 and result["teacher"] is None
  assert result["validation"]["max_rows"] == 1 and not result["validation"]["whole_split"]
  assert all(d["rows"] == 1 and "teacher_ce" not in d for d in result["domains"].values())
  controller = _rows(cli_env["workdir"], "eval", 2)
  for name, d in result["domains"].items():
    assert d["student_ce"] == pytest.approx(controller[f"val/{name}/ce"], abs=1e-6)
    assert d["student_ce"] != pytest.approx(whole_split[1]["domains"][name]["student_ce"], abs=1e-6)
  assert "teacher CE" not in p.stdout
  assert not os.path.exists(os.path.join(cli_env["workdir"], "eval", "step_2_max_rows_1.json"))


def test_hf_export_gives_the_same_numbers(cli_env, whole_split, tmp_path):
  hf_dir = tmp_path / "hf"
  p = _run("ddk_jax.export", f"--workdir={cli_env['workdir']}", f"--out={hf_dir}", "--dtype=float32",
           env=cli_env["env"])
  assert p.returncode == 0, p.stderr[-3000:]
  out = tmp_path / "hf_eval.json"
  p = _run(EVALUATE, cli_env["config"], cli_env["cache"], f"--hf_path={hf_dir}", f"--out={out}", env=cli_env["env"])
  assert p.returncode == 0, p.stderr[-3000:]
  result, reference = _read(out), whole_split[1]
  assert result["student"] == {"source": "hf", "path": str(hf_dir)}
  assert result["teacher"]["from"] == "config"  # no run: the config's teacher (the same random init here)
  for name, d in result["domains"].items():
    ref = reference["domains"][name]
    assert d["rows"] == ref["rows"] and d["tokens"] == ref["tokens"]
    assert d["student_ce"] == pytest.approx(ref["student_ce"], abs=1e-6)
    assert d["teacher_ce"] == pytest.approx(ref["teacher_ce"], abs=1e-6)


def _assert_usage_error(p: subprocess.CompletedProcess, *needles: str) -> None:
  assert p.returncode == 2, f"rc={p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}"
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"{EVALUATE}: error: "), p.stderr[-3000:]
  for n in needles:
    assert n in lines[0], lines[0]


@pytest.mark.parametrize("args, needles", [
    ([], ["exactly one of --workdir", "--hf_path"]),
    (["--workdir={run}", "--hf_path={root}"], ["exactly one of --workdir"]),
    (["--workdir={root}/nope"], ["nope does not exist"]),
    (["--workdir={root}"], ["is not a ddk_jax run"]),
    (["--workdir={run}", "--step=7"], ["--step=7", "committed steps: 1, 2, 3"]),
    (["--workdir={run}", "--max_rows=-1"], ["--max_rows=-1", ">= 0"]),
    (["--workdir={run}", "--out={root}"], ["is a directory"]),
    (["--workdir={run}", "--config.data.num_validation_docs=0"], ["validation split would be empty"]),
    (["--hf_path={root}/no_hf", "--out={root}/x.json"], ["--hf_path=", "no_hf does not exist"]),
    (["--hf_path={run}", "--out={root}/x.json"], ["config.json is missing"]),
    (["--hf_path={run}"], ["--out=FILE.json is required with --hf_path"]),
    (["--hf_path={run}", "--step=1", "--out={root}/x.json"], ["--step selects a checkpoint"]),
    (["--hf_path={hf}", "--out={root}/x.json", "--config.teacher.source=hf", "--config.teacher.path={root}/no_t"],
     ["the teacher (teacher.path=", "no_t does not exist", "--noteacher"]),
    (["--workdir={run}", "stray"], ["unexpected arguments stray"]),
    (["--workdir={run}", "--stepp=2"], ["did you mean --step?"]),
])
def test_user_mistakes_are_one_line_and_exit_2(cli_env, args, needles, tmp_path):
  hf_dir = tmp_path / "hf"
  if any("{hf}" in a for a in args):  # a loadable HF student (the export of the run)
    p = _run("ddk_jax.export", f"--workdir={cli_env['workdir']}", f"--out={hf_dir}", env=cli_env["env"])
    assert p.returncode == 0, p.stderr[-3000:]
  root = tmp_path / "scratch"
  root.mkdir()
  args = [a.format(run=cli_env["workdir"], root=root, hf=hf_dir) for a in args]
  p = _run(EVALUATE, cli_env["config"], cli_env["cache"], *args, env=cli_env["env"], timeout=120)
  _assert_usage_error(p, *needles)


def test_missing_config_is_one_line(cli_env):
  _assert_usage_error(_run(EVALUATE, f"--workdir={cli_env['workdir']}", env=cli_env["env"], timeout=60),
                      "--config is required")


# ---- the trainer: final numbers on the whole split when the controller's rows are capped ------------


# Embeddings padded past the tokenizer's 400 ids: both the trainer and the evaluation score
# the tokenizer's ids only.
PADDED = {"student.model.vocab_size": 448, "teacher.model.vocab_size": 512}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """In-process runs (the emulated 8-device mesh, as `evaluate_checkpoint` runs here): capped and not."""
  from ddk_jax import trainer
  root = tiny_run.shared_root(tmp_path_factory)
  out = {}
  with tiny_run.compilation_cache(os.path.join(root, "jax_cache")):
    assets = tiny_run.shared_assets(root)
    for name, overrides in (("capped", dict(CAPPED, **PADDED)),
                            ("whole", dict(CAPPED, **PADDED, **{"ddk.eval_max_rows": 0}))):
      cfg = tiny_run.tiny_config(assets, **overrides)
      workdir = str(tmp_path_factory.mktemp(f"evaluate_{name}"))
      out[name] = (cfg, workdir, trainer.train(cfg, workdir))
    yield out


def _initial_student_losses(cfg, max_rows: int) -> np.ndarray:
  """The tiny run's student at step 0 (random init from seed), scored without the trainer or
  `evaluate_checkpoint` (its `score` adds only the log lines to `validation.evaluate_domains`)."""
  import jax
  from ddk_jax import data, evaluate, sharding, train_step as ts
  from ddk_jax.config_validation import model_config
  mcfg = model_config(cfg, "student")
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh.rules)
  sh = ts.params_shardings(mcfg, mesh, rules)
  params = ts.init_params_sharded(mcfg, jax.random.key(cfg.seed), sh)
  opts = ts.StepOptions(num_domains=3, mode="cpt", loss=ts.LossSpec(valid_vocab=400))  # the tokenizer's ids
  eval_fn = ts.jit_eval_step(ts.make_eval_step(mcfg, opts), sh, mesh, rules)
  batches = data.build_validation(cfg.data, batch_size=cfg.ddk.eval_batch_size, max_rows=max_rows)
  return evaluate.score(eval_fn, params, batches, mesh, rules, list(tiny_run.DOMAINS))[0]


def test_capped_run_reports_the_whole_split(trained):
  from ddk_jax import evaluate
  cfg, workdir, summary = trained["capped"]
  result = evaluate.evaluate_checkpoint(cfg, workdir=workdir)
  names = list(tiny_run.DOMAINS)
  assert result["validation"]["whole_split"] and result["validation"]["scored_vocab"] == 400
  np.testing.assert_allclose(summary["student_final"], [result["domains"][n]["student_ce"] for n in names],
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(summary["teacher_final"], [result["domains"][n]["teacher_ce"] for n in names],
                             rtol=0, atol=1e-6)
  # "before" is the step-0 student on the same (whole) rows; the controller's lT stays on its own rows.
  np.testing.assert_allclose(summary["student_initial"], _initial_student_losses(cfg, 0), rtol=0, atol=1e-6)
  assert not np.allclose(summary["teacher"], summary["teacher_final"])
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["student_final"] == summary["student_final"]
  assert summary["rows"]["controller"] == {"max_rows": 1, "per_domain": {n: 1 for n in names}}
  whole = summary["rows"]["final"]["per_domain"]
  assert summary["rows"]["final"]["max_rows"] == 0 and whole == {n: result["domains"][n]["rows"] for n in names}
  # The controller's curves keep their rows; the whole-split numbers are logged apart, once each.
  assert [r["step"] for r in tiny_run.metrics(workdir) if r["kind"] == "eval"] == [0, 2, 3]
  assert [r["step"] for r in tiny_run.metrics(workdir) if r["kind"] == "eval_whole"] == [0, 3]
  assert [r["step"] for r in tiny_run.metrics(workdir) if r["kind"] == "teacher_eval_whole"] == [3]
  report = open(os.path.join(workdir, "report.md")).read()
  assert "the DDK controller scores the first 1 row per domain" in report
  assert ("the whole validation split (" + ", ".join(f"{n} {whole[n]}" for n in names) + " rows of 32 tokens)"
          in report)
  assert "student before training (scored once on it at step 0)" in report
  for i, n in enumerate(names):
    assert (f"| {n} | {math.exp(summary['student_initial'][i]):.2f} | {math.exp(summary['student_final'][i]):.2f} | "
            f"{math.exp(summary['teacher_final'][i]):.2f} |") in report


def test_uncapped_run_uses_one_set_of_rows(trained):
  from ddk_jax import evaluate
  cfg, workdir, summary = trained["whole"]
  result = evaluate.evaluate_checkpoint(cfg, workdir=workdir)
  names = list(tiny_run.DOMAINS)
  np.testing.assert_allclose(summary["student_final"], [result["domains"][n]["student_ce"] for n in names],
                             rtol=0, atol=1e-6)
  assert summary["teacher_final"] == summary["teacher"]
  assert summary["rows"]["controller"]["per_domain"] == summary["rows"]["final"]["per_domain"]
  # Same init, same whole-split rows: the same "before" as the capped run's.
  np.testing.assert_allclose(summary["student_initial"], trained["capped"][2]["student_initial"], rtol=0, atol=1e-6)
  kinds = {r["kind"] for r in tiny_run.metrics(workdir)}
  assert "eval_whole" not in kinds and "teacher_eval_whole" not in kinds
  report = open(os.path.join(workdir, "report.md")).read()
  assert "for the DDK controller and for every number below" in report


# ---- downstream tasks: --tasks, and eval.tasks in training -------------------------------------------


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  return tiny_run.local_math_task(tiny_run.shared_root(tmp_path_factory))


def test_tasks_add_accuracies_to_the_json_and_the_table(cli_env, whole_split, task_dir, tmp_path):
  out = tmp_path / "tasks.json"
  env = dict(cli_env["env"], DDK_DOWNSTREAM_TASKS=task_dir)
  p = _run(EVALUATE, cli_env["config"], cli_env["cache"], f"--workdir={cli_env['workdir']}", "--noteacher",
           "--tasks=ddk_math", "--limit=3", f"--out={out}", env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  result = _read(out)
  m = result["downstream"]["ddk_math"]
  assert set(m) >= {"acc", "acc_stderr", "acc_norm", "num_samples"} and m["num_samples"] == 3
  assert m["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
  s = result["downstream_settings"]
  assert s["tasks"] == ["ddk_math"] and s["limit"] == 3 and s["num_fewshot"] == 0 and s["seq_len"] == 256
  assert result["seconds"]["downstream"] == s["seconds"]
  lines = p.stdout.splitlines()
  assert any(line.startswith("downstream tasks ddk_math: at most 3 documents per task, 0-shot") for line in lines)
  row = next(line.split() for line in lines if line.startswith("ddk_math "))
  assert row == ["ddk_math", f"{m['acc']:.4f}", f"{m['acc_stderr']:.4f}", f"{m['acc_norm']:.4f}", "3"]
  # The validation numbers are those of the run without --tasks.
  plain = whole_split[1]
  for name, d in result["domains"].items():
    assert d["student_ce"] == pytest.approx(plain["domains"][name]["student_ce"], abs=1e-6)


@pytest.mark.parametrize("args, needles", [
    (["--limit=3"], ["--limit applies to downstream tasks", "--tasks="]),
    (["--tasks=ddk_math", "--num_fewshot=-1"], ["--num_fewshot=-1", ">= 0"]),
    (["--tasks=ddk_math,ddk_mathh"], ["unknown task 'ddk_mathh'", "did you mean ddk_math?"]),
])
def test_task_mistakes_are_one_line_and_exit_2(cli_env, args, needles):
  p = _run(EVALUATE, cli_env["config"], cli_env["cache"], f"--workdir={cli_env['workdir']}", *args,
           env=cli_env["env"], timeout=120)
  _assert_usage_error(p, *needles)


TASKS_RUN = {"steps": 4, "ddk.interval": 2, "checkpoint.every": 2, "eval.tasks": "ddk_math", "eval.tasks_every": 2,
             "eval.tasks_limit": 3}


def test_training_runs_the_tasks_at_the_configured_steps(tmp_path_factory, task_dir, monkeypatch):
  from ddk_jax import evaluate, trainer
  from ddk_jax.downstream import harness
  monkeypatch.setattr(harness, "DEFAULT_TASK_DIR", task_dir)
  built = []
  real = evaluate.task_adapter
  monkeypatch.setattr(evaluate, "task_adapter", lambda *a, **k: built.append(1) or real(*a, **k))
  root = tiny_run.shared_root(tmp_path_factory)
  workdir = str(tmp_path_factory.mktemp("tasks_run"))
  with tiny_run.compilation_cache(os.path.join(root, "jax_cache")):
    cfg = tiny_run.tiny_config(tiny_run.shared_assets(root), **TASKS_RUN)
    summary = trainer.train(cfg, workdir)
    rows = [r for r in tiny_run.metrics(workdir) if r["kind"] == "tasks"]
    assert [r["step"] for r in rows] == [2, 4]  # every eval.tasks_every steps and at the end
    assert len(built) == 1  # one adapter (one compiled forward) for the run
    final = {k: v for k, v in rows[-1].items() if k.startswith("tasks/")}
    assert set(final) >= {"tasks/ddk_math/acc", "tasks/ddk_math/acc_norm", "tasks/ddk_math/num_samples"}
    assert summary["downstream"] == {"ddk_math": {k.split("/")[-1]: v for k, v in final.items()}}
    assert summary["downstream_settings"]["step"] == 4 and summary["downstream_settings"]["limit"] == 3
    with open(os.path.join(workdir, "summary.json")) as f:
      assert json.load(f)["downstream"] == summary["downstream"]
    with open(os.path.join(workdir, "report.md")) as f:
      report = f.read()
    acc = summary["downstream"]["ddk_math"]
    assert "## Downstream tasks" in report and "at most 3 documents per task, 0-shot" in report
    assert f"| ddk_math | {acc['acc']:.4f} ± {acc['acc_stderr']:.4f} | {acc['acc_norm']:.4f} | 3 |" in report
    # The final checkpoint evaluated with --tasks gives the same accuracies.
    result = evaluate.evaluate_checkpoint(cfg, workdir=workdir, teacher=False, tasks="ddk_math", limit=3)
    assert result["downstream"] == summary["downstream"]
    # A finished run rewrites its report with the same results, without running the tasks again.
    built.clear()
    again = trainer.train(cfg, workdir)
    assert again["downstream"] == summary["downstream"] and not built
  assert [r["step"] for r in tiny_run.metrics(workdir) if r["kind"] == "tasks"] == [2, 4]


@pytest.mark.parametrize("overrides, needle", [
    ({"eval.tasks_every": -1}, "eval.tasks_every=-1: must be >= 0"),
    ({"eval.tasks": "ddk_math", "eval.tasks_limit": -2}, "eval.tasks_limit=-2: must be >= 0"),
])
def test_bad_task_settings_fail_before_training(tmp_path_factory, overrides, needle, tmp_path):
  from ddk_jax import trainer
  from ddk_jax.config_validation import ConfigError
  cfg = tiny_run.tiny_config(tiny_run.shared_assets(tiny_run.shared_root(tmp_path_factory)), **overrides)
  with pytest.raises(ConfigError, match=needle):
    trainer.train(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_default_settings_run_no_tasks(trained):
  _, workdir, summary = trained["whole"]
  assert "downstream" not in summary
  assert not [r for r in tiny_run.metrics(workdir) if r["kind"] == "tasks"]
