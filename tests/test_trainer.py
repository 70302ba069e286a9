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


def test_validation_row_cap(runs, assets, tmp_path):
  """ddk.eval_max_rows=1: teacher and student are scored on each domain's first row only,
  so both differ from the full-split losses of the same initial models."""
  _, full = runs["ddk"]
  capped = trainer.train(tiny_run.tiny_config(assets, mode="ddk", steps=3, **{"ddk.eval_max_rows": 1}),
                         str(tmp_path / "capped"))
  assert [r["step"] for r in _rows(str(tmp_path / "capped"), "eval")] == [0, 3]
  for key in ("teacher", "student_initial"):
    assert np.all(np.isfinite(capped[key]))
    assert not np.allclose(capped[key], full[key]), key


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
