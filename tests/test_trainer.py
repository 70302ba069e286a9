"""The training loop end to end on a tiny 3-domain corpus: modes, outputs, DDK updates."""

import json
import os

import numpy as np
import pytest

import tiny_run
from ddk_jax import trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return tiny_run.make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
  """One short run per mode that the tests below inspect (same data, steps and seeds)."""
  out = {}
  for mode in ("ddk", "ddk_no_smoothing", "ddk_equal_sampling", "kd", "cpt"):
    workdir = str(tmp_path_factory.mktemp(mode))
    cfg = tiny_run.tiny_config(assets, mode=mode, steps=6, **{"ddk.interval": 3, "logging.tensorboard": mode == "ddk"})
    out[mode] = (workdir, trainer.train(cfg, workdir))
  return out


def _rows(workdir, kind):
  return [r for r in tiny_run.metrics(workdir) if r["kind"] == kind]


def test_ddk_run_writes_every_output(runs):
  workdir, summary = runs["ddk"]
  assert summary["status"] == "done" and summary["step"] == 6
  for name in ("report.md", "summary.json", "domain_weights.png", "val_perplexity.png", "metrics.jsonl"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  train = _rows(workdir, "train")
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["loss"]) and r["kl"] > 0 and r["tokens_per_s"] > 0 for r in train)
  # Updates at step 0 (before training) and every K=3 steps; the teacher is evaluated once.
  assert [r["step"] for r in _rows(workdir, "weights")] == [0, 3]
  assert len(_rows(workdir, "teacher_eval")) == 1
  report = open(os.path.join(workdir, "report.md")).read()
  for domain in tiny_run.DOMAINS:
    assert f"| {domain} |" in report
  # The controller's validation (teacher once + 2 updates) is part of all validation
  # (+ the final one), which is part of the wall time; the report gives the share.
  assert 0 < summary["controller_eval_seconds"] < summary["eval_seconds"] < summary["wall_seconds"]
  share = 100 * summary["controller_eval_seconds"] / summary["wall_seconds"]
  assert f"controller's validation (teacher once, student at every update) " \
         f"{summary['controller_eval_seconds']:.1f} s ({share:.1f}%)" in report


def _teacher_losses_on(assets, max_rows: int) -> np.ndarray:
  """The tiny run's teacher (random init, seed + 1) scored on each domain's first `max_rows`
  validation rows, computed here without the trainer."""
  import jax
  from ddk_jax import data, sharding, train_step as ts, validation
  from ddk_jax.config_validation import model_config
  cfg = tiny_run.tiny_config(assets)
  mcfg = model_config(cfg, "teacher")
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh.rules)
  sh = ts.params_shardings(mcfg, mesh, rules)
  params = ts.init_params_sharded(mcfg, jax.random.key(cfg.seed + 1), sh)
  eval_fn = ts.jit_eval_step(ts.make_eval_step(mcfg, ts.StepOptions(num_domains=3, mode="cpt")), sh, mesh, rules)
  batches = data.build_validation(cfg.data, batch_size=cfg.ddk.eval_batch_size, max_rows=max_rows)
  return validation.evaluate_domains(eval_fn, params, batches, mesh, rules, list(tiny_run.DOMAINS))[0]


def test_validation_row_cap(runs, assets, tmp_path):
  """ddk.eval_max_rows=1: the teacher is scored on each domain's first row only."""
  _, full = runs["ddk"]
  capped = trainer.train(tiny_run.tiny_config(assets, mode="ddk", steps=3, **{"ddk.eval_max_rows": 1}),
                         str(tmp_path / "capped"))
  assert [r["step"] for r in _rows(str(tmp_path / "capped"), "eval")] == [0, 3]
  np.testing.assert_allclose(capped["teacher"], _teacher_losses_on(assets, 1), rtol=1e-6)
  np.testing.assert_allclose(full["teacher"], _teacher_losses_on(assets, 0), rtol=1e-6)
  assert not np.allclose(capped["teacher"], full["teacher"])


def test_teacher_losses_follow_the_validation_rows_on_resume(assets, tmp_path):
  """A resume that changes which rows are scored (here eval_max_rows, accepted with
  --allow_config_change; a new process count does the same) scores the teacher again, so
  lS / lT compares both models on the same rows."""
  workdir = str(tmp_path / "run")
  first = trainer.train(tiny_run.tiny_config(assets, steps=2, **{"ddk.eval_max_rows": 1}), workdir)
  np.testing.assert_allclose(first["teacher"], _teacher_losses_on(assets, 1), rtol=1e-6)
  resumed = trainer.train(tiny_run.tiny_config(assets, steps=4, **{"ddk.eval_max_rows": 2}), workdir,
                          allow_config_change=True)
  np.testing.assert_allclose(resumed["teacher"], _teacher_losses_on(assets, 2), rtol=1e-6)
  assert [r["step"] for r in _rows(workdir, "teacher_eval")] == [0, 2]


def _expected_rows_per_step(workdir: str, steps: int, initial_weights, batch: int = 8) -> list[list[int]]:
  """The domains the mixture must draw at each step: row j of step k has draw counter
  k * batch + j and uses the weights of the last update at or before step k."""
  import bisect
  import itertools
  from ddk_jax.data.mixture import counter_uniform
  updates = {r["step"]: [r[f"weights/{d}"] for d in tiny_run.DOMAINS] for r in _rows(workdir, "weights")}
  weights, out = list(initial_weights), []
  for k in range(steps):
    weights = updates.get(k, weights)
    cumulative = list(itertools.accumulate(weights))
    counts = [0, 0, 0]
    for j in range(batch):
      u = counter_uniform(0, 0, k * batch + j)
      counts[min(bisect.bisect_right(cumulative, u * cumulative[-1]), 2)] += 1
    out.append(counts)
  return out


def _logged_rows_per_step(workdir: str) -> list[list[int]]:
  return [[r[f"rows/{d}"] for d in tiny_run.DOMAINS] for r in _rows(workdir, "train")]


def test_training_rows_follow_the_weights_of_each_update(runs):
  workdir, summary = runs["ddk"]
  assert [r["step"] for r in _rows(workdir, "weights")] == [0, 3]
  assert _logged_rows_per_step(workdir) == _expected_rows_per_step(workdir, 6, initial_weights=[1, 2, 1])


def test_without_an_update_at_start_the_controller_weights_are_sampled(assets, tmp_path):
  """update_at_start=False: the first K steps sample the controller's weights (uniform for
  equal sampling, not the data config's 1:2:1), and the report's "before" losses are step 0's."""
  workdir = str(tmp_path / "eq")
  cfg = tiny_run.tiny_config(assets, mode="ddk_equal_sampling", steps=4,
                             **{"ddk.interval": 3, "ddk.update_at_start": False})
  summary = trainer.train(cfg, workdir)
  assert _logged_rows_per_step(workdir) == _expected_rows_per_step(workdir, 4, initial_weights=[1, 1, 1])
  assert _logged_rows_per_step(workdir) != _expected_rows_per_step(workdir, 4, initial_weights=[1, 2, 1])
  evals = _rows(workdir, "eval")
  assert [r["step"] for r in evals] == [0, 3, 4]
  assert summary["student_initial"] == [evals[0][f"val/{d}/ce"] for d in tiny_run.DOMAINS]


def test_ddk_weights_follow_the_controller_formula(runs):
  workdir, summary = runs["ddk"]
  hist = [r for r in _rows(workdir, "weights")]
  first = np.array([hist[0][f"weights/{d}"] for d in tiny_run.DOMAINS])
  ls0 = np.array(summary["student_initial"])
  lt = np.array(summary["teacher"])
  x = np.exp(ls0 / lt)
  np.testing.assert_allclose(first, 0.5 * x / x.sum() + 0.5 / 3, rtol=1e-9)
  assert abs(sum(summary["weights"]) - 1) < 1e-12


def test_modes_share_data_init_and_validation(runs):
  initial = {m: runs[m][1]["student_initial"] for m in runs}
  for m in runs:
    np.testing.assert_array_equal(initial[m], initial["ddk"])  # same init and validation data
  # Static and equal-sampling modes keep their mixture; the DDK modes move it.
  assert runs["ddk_equal_sampling"][1]["weights"] == pytest.approx([1 / 3] * 3)
  assert runs["kd"][1]["weights"] == pytest.approx([0.25, 0.5, 0.25])  # data.domains weights 1:2:1
  assert runs["ddk"][1]["weights"] != pytest.approx([1 / 3] * 3)
  assert runs["ddk_no_smoothing"][1]["weights"] != runs["ddk"][1]["weights"]


def test_cpt_has_no_teacher(runs):
  workdir, summary = runs["cpt"]
  assert summary["teacher"] is None
  assert all(r["kl"] == 0 for r in _rows(workdir, "train"))
  assert not _rows(workdir, "teacher_eval")
  assert "| - |" in open(os.path.join(workdir, "report.md")).read()


def test_summary_json_round_trips(runs):
  workdir, summary = runs["ddk"]
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["student_final"] == summary["student_final"]


def test_training_improves_the_student(runs):
  _, summary = runs["kd"]
  assert np.mean(summary["student_final"]) < np.mean(summary["student_initial"])
