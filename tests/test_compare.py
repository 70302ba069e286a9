"""`python -m ddk_jax.compare` on the tiny experiment: 2 modes x 2 seeds from one shared,
pre-trained teacher, evaluated on the whole validation split and on a tiny local task.

The domains get validation files (seeds other than 0 need them: data.seed also picks held-out
documents), the teacher is pre-trained for 2 steps into <workdir>/shared/teacher, and the
student is randomly initialised from the run seed."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data_helpers as testing
import tiny_run

COMPARE = "ddk_jax.compare"
MODES, SEEDS = ("cpt", "ddk"), (0, 1)
RUNS = [f"{m}_s{s}" for m in MODES for s in SEEDS]
STEPS = 4


def _overrides(root: str, assets: str) -> dict:
  domains = []
  for i, (name, weight) in enumerate((("short", 1.0), ("long", 2.0), ("mixed", 1.0))):
    path = os.path.join(root, f"{name}_validation.jsonl")
    kw = {"min_words": 40, "max_words": 90} if name == "long" else {}
    testing.write_jsonl(path, testing.make_texts(4, f"{name}_val", seed=10 + i, **kw))
    domains.append({"name": name, "train": [os.path.join(assets, f"{name}.jsonl")], "validation": [path],
                    "weight": weight})
  return {"steps": STEPS, "ddk.interval": 2, "checkpoint.every": 2, "data.domains": domains,
          "data.prepared_dir": os.path.join(root, "prepared"), "teacher.source": "workdir",
          "teacher.path": "teacher", "teacher.pretrain_steps": 2}


def _run(*args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", COMPARE, *args], cwd=tiny_run.REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _read(path) -> dict:
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("compare")
  shared = tiny_run.shared_root(tmp_path_factory)
  assets = tiny_run.shared_assets(shared)
  overrides = _overrides(str(root), assets)
  config = tiny_run.write_config_file(str(root / "tiny.py"), assets, **overrides)
  env = tiny_run.env_for(1, cache_dir=str(root / "jax_cache"), DDK_DOWNSTREAM_TASKS=tiny_run.local_math_task(shared))
  args = [f"--config={config}", f"--config.compilation_cache_dir={env['JAX_COMPILATION_CACHE_DIR']}",
          f"--workdir={root / 'out'}", f"--modes={','.join(MODES)}", f"--seeds={','.join(map(str, SEEDS))}",
          "--tasks=ddk_math", "--limit=3"]
  return {"root": root, "assets": assets, "overrides": overrides, "config": config, "env": env, "args": args,
          "out": str(root / "out")}


@pytest.fixture(scope="module")
def compared(setup):
  p = _run(*setup["args"], env=setup["env"])
  assert p.returncode == 0, p.stderr[-4000:]
  return p, _read(os.path.join(setup["out"], "comparison.json"))


def test_every_run_shares_the_teacher_and_the_budget(setup, compared):
  p, comp = compared
  out = setup["out"]
  teacher = os.path.join(out, "shared", "teacher")
  assert p.stderr.count("teacher: pre-training 2 steps") == 1  # once, for every run
  assert os.path.exists(os.path.join(teacher, "summary.json"))
  assert comp["budget"] == {"steps": STEPS, "global_batch_size": 8, "seq_len": 32, "tokens": STEPS * 8 * 32}
  assert [r["name"] for r in comp["runs"]] == RUNS and comp["modes"] == list(MODES) and comp["seeds"] == list(SEEDS)
  for name in RUNS:
    _, meta = _meta(out, name, STEPS)
    mode, seed = name.split("_s")
    cfg = meta["config"]
    assert cfg["mode"] == mode and cfg["steps"] == STEPS and cfg["global_batch_size"] == 8
    assert cfg["teacher"]["path"] == teacher
    assert cfg["seed"] == int(seed) and cfg["data"]["seed"] == int(seed)
    expected_prepared = setup["overrides"]["data.prepared_dir"] if seed == "0" else os.path.join(
        out, "shared", f"prepared_s{seed}")
    assert cfg["data"]["prepared_dir"] == expected_prepared
  # The seed changes the data order: the two ddk runs drew other rows from the domains.
  rows = [[r for r in tiny_run.metrics(os.path.join(out, f"ddk_s{s}")) if r["kind"] == "train"] for s in SEEDS]
  assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == list(range(1, STEPS + 1))
  drawn = [[[r[f"rows/{d}"] for d in tiny_run.DOMAINS] for r in seed_rows] for seed_rows in rows]
  assert drawn[0] != drawn[1]
  for i, name in enumerate(RUNS):
    assert f"compare [{i + 1}/4] {name.replace('_s', ' seed ')}: training {STEPS} steps" in p.stderr


def _meta(out: str, name: str, step: int) -> tuple[str, dict]:
  path = os.path.join(out, name, "checkpoints", str(step), "meta", "metadata")
  return path, _read(path)


def test_comparison_equals_the_runs_evaluations(setup, compared):
  _, comp = compared
  out = setup["out"]
  names = list(tiny_run.DOMAINS)
  assert comp["domains"] == names
  evals = {}
  for r in comp["runs"]:
    e = _read(os.path.join(out, r["name"], "eval", f"step_{STEPS}.json"))
    evals[r["name"]] = e
    assert e["student"] == {"source": "workdir", "workdir": os.path.join(out, r["name"]), "step": STEPS}
    assert e["validation"]["whole_split"] and e["validation"]["rows_key"] == comp["validation"]["rows_key"]
    assert r["ce"] == {d: e["domains"][d]["student_ce"] for d in names}
    assert r["ppl"] == {d: e["domains"][d]["student_ppl"] for d in names}
    assert r["mean_ppl"] == e["mean"]["student_ppl"]
    assert r["downstream"] == e["downstream"] and set(r["downstream"]) == {"ddk_math"}
    assert r["downstream"]["ddk_math"]["num_samples"] == 3
    assert r["mean_acc"] == e["downstream"]["ddk_math"]["acc"]
  # The teacher is scored once (with the first run that distils), on the same rows.
  assert [n for n, e in evals.items() if e["teacher"]] == ["ddk_s0"]
  teacher = evals["ddk_s0"]["domains"]
  assert comp["teacher"]["ce"] == {d: teacher[d]["teacher_ce"] for d in names}
  for r in comp["runs"]:
    ratios = {d: r["ce"][d] / teacher[d]["teacher_ce"] for d in names}
    worst = max(ratios, key=ratios.get)
    assert r["worst_ratio"] == {"domain": worst, "ratio": pytest.approx(ratios[worst])}
  # Per mode: mean and sample standard deviation over the two seeds.
  for mode in MODES:
    runs = [r for r in comp["runs"] if r["mode"] == mode]
    m = comp["by_mode"][mode]
    for d in names:
      vals = [r["ppl"][d] for r in runs]
      assert m["ppl"][d] == {"mean": pytest.approx(np.mean(vals)), "sd": pytest.approx(np.std(vals, ddof=1)), "n": 2}
    assert m["mean_ppl"]["mean"] == pytest.approx(np.mean([r["mean_ppl"] for r in runs]))
    assert m["acc"]["ddk_math"]["mean"] == pytest.approx(np.mean([r["downstream"]["ddk_math"]["acc"] for r in runs]))
  # The paper's ordering needs kd too: reported as not checked, with the measured order.
  claim = comp["claim"]["perplexity"]
  assert claim["holds"] is None and claim["missing"] == ["kd"]
  assert claim["order"] == sorted(MODES, key=lambda mode: comp["by_mode"][mode]["mean_ppl"]["mean"])


def test_evaluation_files_hold_what_evaluate_measures(setup, compared):
  """The numbers are evaluate_checkpoint's, measured again here in-process (8 devices)."""
  from ddk_jax import evaluate
  _, comp = compared
  cfg = tiny_run.tiny_config(setup["assets"], **setup["overrides"])
  run = next(r for r in comp["runs"] if r["name"] == "ddk_s1")
  with tiny_run.compilation_cache(os.path.join(str(setup["root"]), "jax_cache_in_process")):
    result = evaluate.evaluate_checkpoint(cfg, workdir=run["workdir"], teacher=False)
  for d in comp["domains"]:
    assert result["domains"][d]["student_ce"] == pytest.approx(run["ce"][d], abs=1e-6)


def test_markdown_has_the_tables_and_the_plots(setup, compared):
  _, comp = compared
  out = setup["out"]
  with open(os.path.join(out, "comparison.md")) as f:
    md = f.read()
  assert "| mode | short | long | mixed | mean | worst | mean CE | worst student/teacher CE ratio |" in md
  t = comp["teacher"]
  assert f"| teacher | {t['ppl']['short']:.2f} | {t['ppl']['long']:.2f} | {t['ppl']['mixed']:.2f} |" in md
  for mode in MODES:
    worst = comp["by_mode"][mode]["worst_ppl"]
    assert worst["mean"] == pytest.approx(np.mean([max(r["ppl"].values()) for r in comp["runs"] if r["mode"] == mode]))
  gap = comp["claim"]["versus"]["ddk"]["cpt"]["mean_ce"]
  assert "## Against ddk" in md and f"| cpt | {comp['claim']['versus']['ddk']['cpt']['mean_ppl']['gap']:+.2f}" in md
  by_mode = comp["by_mode"]
  assert gap["gap"] == pytest.approx(by_mode["ddk"]["mean_ce"]["mean"] - by_mode["cpt"]["mean_ce"]["mean"])
  for mode in MODES:
    m = comp["by_mode"][mode]
    s = m["ppl"]["short"]
    assert f"| {mode} | {s['mean']:.2f} ± {s['sd']:.2f} |" in md
    a = m["acc"]["ddk_math"]
    assert f"| {mode} | {a['mean']:.4f} ± {a['sd']:.4f} |" in md
  assert "| mode | ddk_math | mean |" in md and "at most 3 documents per task, 0-shot" in md
  assert "## The paper's claim" in md and "Not checked: kd not compared" in md
  assert comp["plots"] == ["comparison_perplexity.png", "comparison_weights.png"]
  for plot in comp["plots"]:
    assert f"![{plot}]({plot})" in md
    with open(os.path.join(out, plot), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  for name in RUNS:
    assert f"| {name} | " in md
  p, _ = compared
  assert "cpt  " in p.stdout and "ddk  " in p.stdout and p.stdout.rstrip().endswith("comparison.json")


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(setup, compared):
  out = setup["out"]
  before = {n: os.path.getsize(os.path.join(out, n, "metrics.jsonl")) for n in RUNS}
  p = _run(*setup["args"], env=setup["env"])
  assert p.returncode == 0, p.stderr[-4000:]
  for i, name in enumerate(RUNS):
    where = f"compare [{i + 1}/4] {name.replace('_s', ' seed ')}"
    assert f"{where}: skipping training: finished at step {STEPS}" in p.stderr
    assert f"{where}: skipping evaluation: " in p.stderr
  assert "training 4 steps" not in p.stderr and "pre-training" not in p.stderr
  assert {n: os.path.getsize(os.path.join(out, n, "metrics.jsonl")) for n in RUNS} == before
  assert _read(os.path.join(out, "comparison.json")) == compared[1]

  # ddk_s1 cut back to its checkpoint of step 2, as a run killed before its end: it resumes there
  # (and is evaluated again); the others are skipped.
  shutil.rmtree(os.path.join(out, "ddk_s1", "checkpoints", str(STEPS)))
  os.remove(os.path.join(out, "ddk_s1", "summary.json"))
  p = _run(*setup["args"], env=setup["env"])
  assert p.returncode == 0, p.stderr[-4000:]
  assert p.stderr.count("skipping training") == 3 and "compare [4/4] ddk seed 1: training 4 steps" in p.stderr
  assert "at step 2" in p.stderr and "compare [4/4] ddk seed 1: evaluating" in p.stderr
  again = _read(os.path.join(out, "comparison.json"))
  first = compared[1]
  for a, b in zip(again["runs"], first["runs"]):
    for d in first["domains"]:
      assert a["ce"][d] == pytest.approx(b["ce"][d], abs=1e-6)


def test_a_variant_joins_the_comparison_and_is_judged_against_ddk(setup, compared):
  """A named variant (mode + config keys) added to the finished comparison: only its runs train,
  with its settings, and the tables show it next to the modes and against ddk."""
  out = setup["out"]
  variant = 'ddk_excess: ddk, ddk.discrepancy="excess", ddk.floor={"short": 0.3, "long": 0.1}'
  p = _run(*setup["args"], f"--variant={variant}", env=setup["env"])
  assert p.returncode == 0, p.stderr[-4000:]
  assert p.stderr.count("skipping training") == len(RUNS)
  assert "compare [5/6] ddk_excess seed 0: training 4 steps" in p.stderr
  comp = _read(os.path.join(out, "comparison.json"))
  assert comp["modes"] == [*MODES, "ddk_excess"]
  names = [f"ddk_excess_s{s}" for s in SEEDS]
  assert [r["name"] for r in comp["runs"]] == [*RUNS, *names]
  for name, seed in zip(names, SEEDS):
    cfg = _meta(out, name, STEPS)[1]["config"]
    assert cfg["mode"] == "ddk" and cfg["ddk"]["discrepancy"] == "excess" and cfg["seed"] == seed
    assert cfg["ddk"]["floor"] == {"short": 0.3, "long": 0.1}
    weights = [r for r in tiny_run.metrics(os.path.join(out, name)) if r["kind"] == "weights"]
    assert weights and all(r["weights/short"] >= 0.3 - 1e-6 and r["weights/long"] >= 0.1 - 1e-6 for r in weights)
  run = comp["runs"][-1]
  assert run["mode"] == "ddk_excess" and run["train_mode"] == "ddk"
  assert run["overrides"] == {"ddk.discrepancy": "excess", "ddk.floor": {"short": 0.3, "long": 0.1}}
  by_mode = comp["by_mode"]
  gap = comp["claim"]["versus"]["ddk"]["ddk_excess"]["mean_ppl"]
  assert gap["gap"] == pytest.approx(by_mode["ddk"]["mean_ppl"]["mean"] - by_mode["ddk_excess"]["mean_ppl"]["mean"])
  assert gap["spread"] == pytest.approx(by_mode["ddk"]["mean_ppl"]["sd"] + by_mode["ddk_excess"]["mean_ppl"]["sd"])
  assert gap["beyond_spread"] == (abs(gap["gap"]) > gap["spread"])
  assert "kd" not in comp["claim"]["versus"]  # not compared
  with open(os.path.join(out, "comparison.md")) as f:
    md = f.read()
  assert "## Against ddk" in md and "| ddk_excess |" in md and "| cpt |" in md
  assert "Variants: ddk_excess = ddk, ddk.discrepancy='excess', ddk.floor={'short': 0.3, 'long': 0.1}." in md


@pytest.mark.parametrize("args, needles", [
    (["--variant=ddk_x: ddk, ddk.discrepncy=1"],
     ["ddk.discrepncy is not a config key", "did you mean ddk.discrepancy?"]),
    (["--variant=ddk_x: ddk, ddk.discrepancy='sideways'"], ["discrepancy", "sideways"]),
    (["--variant=ddk: kd"], ["ddk is a mode's name"]),
    (["--modes=cpt,kdd"], ["unknown mode 'kdd'", "did you mean kd?"]),
    (["--modes=ddk,ddk"], ["--modes names ddk twice"]),
    (["--seeds=0,one"], ["--seeds: 'one' is not an integer"]),
    (["--seeds=-1"], ["--seeds: -1 is negative"]),
    (["--limit=5"], ["--limit applies to downstream tasks", "--tasks="]),
    (["--config.ddk.intervall=2"], ["unknown config key 'ddk.intervall'", "--config.ddk.interval"]),
    (["--config.steps=0"], ["steps=0"]),
])
def test_user_mistakes_are_one_line_and_exit_2(setup, args, needles, tmp_path):
  p = _run(*setup["args"][:2], f"--workdir={tmp_path / 'w'}", *args, env=setup["env"], timeout=120)
  _assert_usage_error(p, *needles)


def test_held_out_validation_refuses_other_seeds(setup, tmp_path):
  """The tiny config's own domains hold out validation documents by data.seed."""
  config = tiny_run.write_config_file(str(tmp_path / "held_out.py"), setup["assets"])
  p = _run(f"--config={config}", setup["args"][1], f"--workdir={tmp_path / 'w'}", "--modes=kd", "--seeds=0,2",
           env=setup["env"])
  _assert_usage_error(p, "--seeds=0,2", "seed 2 would validate on documents", "--seeds=0 only")
  assert not os.path.exists(tmp_path / "w" / "kd_s0")


def test_missing_workdir_is_one_line(setup):
  _assert_usage_error(_run(*setup["args"][:2], env=setup["env"], timeout=60), "--workdir is required")


def _assert_usage_error(p: subprocess.CompletedProcess, *needles: str) -> None:
  assert p.returncode == 2, f"rc={p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}"
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"{COMPARE}: error: "), p.stderr[-3000:]
  for n in needles:
    assert n in lines[0], lines[0]


# ---- the paper's claim is computed from the numbers ------------------------------------------------


def _by_mode(ppl: dict, acc: dict | None = None, sd: float | None = None) -> dict:
  def stat(v):
    return None if v is None else {"mean": v, "sd": sd, "n": 1 if sd is None else 3}
  return {m: {"mean_ppl": stat(ppl[m]), "mean_ce": stat(math.log(ppl[m])), "mean_acc": stat((acc or {}).get(m)),
              "worst_ratio": None} for m in ppl}


@pytest.mark.parametrize("ppl, acc, holds", [
    ({"cpt": 30.0, "kd": 20.0, "ddk": 10.0}, {"cpt": 0.3, "kd": 0.4, "ddk": 0.5}, (True, True)),
    ({"cpt": 10.0, "kd": 20.0, "ddk": 30.0}, {"cpt": 0.5, "kd": 0.4, "ddk": 0.3}, (False, False)),
    ({"cpt": 30.0, "kd": 10.0, "ddk": 20.0}, {"cpt": 0.3, "kd": 0.5, "ddk": 0.4}, (False, False)),
])
def test_paper_claim_follows_the_numbers(ppl, acc, holds):
  from ddk_jax import compare
  claim = compare.paper_claim({"by_mode": _by_mode(ppl, acc)})
  assert (claim["perplexity"]["holds"], claim["accuracy"]["holds"]) == holds
  assert claim["ce"]["holds"] == holds[0]
  assert claim["perplexity"]["order"] == sorted(ppl, key=ppl.get)
  assert claim["accuracy"]["order"] == sorted(acc, key=acc.get, reverse=True)


def test_paper_claim_places_the_ablations_and_the_spread():
  from ddk_jax import compare
  by_mode = _by_mode({"cpt": 30.0, "kd": 20.0, "ddk": 19.0, "ddk_no_smoothing": 18.0, "ddk_equal_sampling": 25.0},
                     sd=2.0)
  claim = compare.paper_claim({"by_mode": by_mode})
  assert claim["perplexity"]["holds"] is True
  assert [p["beyond_spread"] for p in claim["perplexity"]["pairs"]] == [False, True]  # gaps 1 and 10 vs 4
  assert claim["ablations"]["ddk_no_smoothing"]["mean_ppl"] == {
      "value": 18.0, "ddk": 19.0, "rank": 1, "of": 5, "worse_than_ddk": False}
  assert claim["ablations"]["ddk_equal_sampling"]["mean_ppl"]["worse_than_ddk"] is True
  assert claim["accuracy"]["holds"] is None and set(claim["accuracy"]["missing"]) == {"cpt", "kd", "ddk"}
  assert math.isclose(claim["perplexity"]["pairs"][0]["gap"], 1.0)


def test_versus_judges_every_entry_against_kd_and_ddk_with_the_spread():
  from ddk_jax import compare
  by_mode = _by_mode({"kd": 20.0, "ddk": 19.0, "ddk_excess": 15.0}, {"kd": 0.40, "ddk": 0.42, "ddk_excess": 0.41},
                     sd=1.0)
  table = compare.versus(by_mode)
  assert set(table) == {"kd", "ddk"} and set(table["kd"]) == {"ddk", "ddk_excess"}
  assert table["kd"]["ddk_excess"]["mean_ppl"] == {"gap": 5.0, "spread": 2.0, "beyond_spread": True}
  assert table["kd"]["ddk"]["mean_ppl"] == {"gap": 1.0, "spread": 2.0, "beyond_spread": False}
  assert table["ddk"]["ddk_excess"]["mean_acc"]["gap"] == pytest.approx(-0.01)  # higher is better: worse here
  one_seed = compare.versus(_by_mode({"kd": 20.0, "x": 10.0}))
  assert one_seed["kd"]["x"]["mean_ppl"] == {"gap": 10.0, "spread": None, "beyond_spread": None}


def test_parse_variant():
  from ddk_jax import compare
  v = compare.parse_variant("ddk_b: ddk, ddk.floor={'math': 0.1, 'code': 0.05}, ddk.cap=0.4, ddk.signal=train")
  assert v == compare.Variant("ddk_b", "ddk", (("ddk.floor", {"math": 0.1, "code": 0.05}), ("ddk.cap", 0.4),
                                               ("ddk.signal", "train")))
  assert compare.parse_variant("x.1: kd") == compare.Variant("x.1", "kd")
  for bad, error in (("ddk_b ddk", "expected NAME: MODE"), ("a b: ddk", "expected NAME: MODE"),
                     ("b: kdd", "'kdd' is not a mode"), ("b: ddk, ddk.cap", "is not KEY=VALUE"),
                     ("b: ddk, mode=kd", "the mode is the first field")):
    with pytest.raises(compare.CompareError, match=error):
      compare.parse_variant(bad)
  with pytest.raises(compare.CompareError, match="names b twice"):
    compare.parse_variants(["b: ddk", "b: kd"])


@pytest.mark.parametrize("text, error", [
    ("", "--modes is empty"), ("cpt,xyz", "unknown mode 'xyz'"), ("kd, kd", "names kd twice")])
def test_parse_modes_errors(text, error):
  from ddk_jax import compare
  with pytest.raises(compare.CompareError, match=error):
    compare.parse_modes(text)


def test_parse_modes_and_seeds():
  from ddk_jax import compare
  assert compare.parse_modes(" cpt , ddk ") == ["cpt", "ddk"]
  assert compare.parse_modes(compare.DEFAULT_MODES) == ["cpt", "kd", "ddk", "ddk_no_smoothing", "ddk_equal_sampling"]
  assert compare.parse_seeds(None) == [0] and compare.parse_seeds("0, 1,2") == [0, 1, 2]
  for bad in ("", "1,1", "a", "-2"):
    with pytest.raises(compare.CompareError):
      compare.parse_seeds(bad)
