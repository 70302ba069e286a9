"""A checkpoint written by an earlier ddk_jax release resumes and finishes exactly as that
release's uninterrupted run did.

tests/data/checkpoint_v1 holds the tiny experiment of tiny_run.py with relative paths
(corpus, tokenizer, prepared shards), its run directory cut back to the checkpoint of step
4 of 8 (checkpoint format 1), and `reference_metrics.jsonl`: the metrics of the writer's
whole 8-step run. Everything was made on one emulated CPU device.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import tiny_run

FIXTURE = os.path.join(tiny_run.TESTS, "data", "checkpoint_v1")


def test_checkpoint_of_format_1_resumes_to_the_same_run(tmp_path):
  work = tmp_path / "fixture"
  shutil.copytree(FIXTURE, work)
  config = tiny_run.write_config_file(str(work / "config.py"), ".", **{"checkpoint.async_save": False})
  proc = subprocess.run(tiny_run.main_command(config, "run"), cwd=work, env=tiny_run.env_for(1),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "at step 4" in proc.stderr, proc.stderr[-3000:]

  reference = work / "reference"
  reference.mkdir()
  shutil.copy(work / "reference_metrics.jsonl", reference / "metrics.jsonl")
  expected = tiny_run.comparable_metrics(str(reference))
  got = tiny_run.comparable_metrics(str(work / "run"))
  assert len(got) == len(expected)
  # Rows may carry fields added since; every field the earlier release logged is identical.
  assert [{k: g[k] for k in e} for g, e in zip(got, expected)] == expected
