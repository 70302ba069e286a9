"""A training run whose workdir, data sources and tokenizer live on gs:// (the local GCS
emulator of tests/gcs_emulator.py), killed with SIGKILL mid-run and resumed: it ends
exactly as the same run on a local disk, with every output in the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

import gcs_emulator
import tiny_run
from ddk_jax import storage


def _env(endpoint: str) -> dict:
  # A fresh process reads these before gcsfs is imported; fsspec takes `token` from FSSPEC_GS_TOKEN.
  return tiny_run.env_for(1, **gcs_emulator.client_env(endpoint), FSSPEC_GS_TOKEN="anon")


def _upload_inputs(assets: str, remote: str) -> dict:
  """The tiny corpus and tokenizer copied into the bucket; overrides that point the run at them."""
  for name in ("short.jsonl", "long.jsonl", "mixed.jsonl"):
    storage.upload_file(os.path.join(assets, name), storage.join(remote, name))
  with open(os.path.join(assets, "assets.json")) as f:
    tok = json.load(f)["tokenizer"]
  storage.upload_dir(tok, storage.join(remote, "tok"))
  cfg = tiny_run.tiny_config(assets)
  domains = [dict(d, train=[storage.join(remote, os.path.basename(d["train"][0]))])
             for d in cfg.data.to_dict()["domains"]]
  return {"data.domains": domains, "data.tokenizer": storage.join(remote, "tok"),
          "data.prepared_dir": os.path.join(assets, "prepared_gcs")}


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 240) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if storage.exists(path):
      return
    if proc.poll() is not None:
      pytest.fail(f"the run ended (rc {proc.returncode}) before {path} appeared")
    time.sleep(0.2)
  pytest.fail(f"{path} did not appear within {timeout} s")


def _metrics(text: str) -> list[dict]:
  rows = [json.loads(line) for line in text.splitlines() if line]
  return [{k: v for k, v in r.items() if k not in tiny_run.TIMING_FIELDS} for r in rows]


def test_gs_workdir_resumes_after_sigkill_to_the_local_run(gcs_emulator, gcs_dir, tmp_path):
  assets = tiny_run.make_assets(str(tmp_path / "assets"))
  overrides = _upload_inputs(assets, storage.join(gcs_dir, "inputs"))
  overrides |= {"steps": 8, "checkpoint.every": 2, "checkpoint.async_save": False, "logging.tensorboard": True}
  config = tiny_run.write_config_file(str(tmp_path / "c.py"), assets, **overrides)
  env = _env(gcs_emulator.endpoint)

  local = str(tmp_path / "local")
  done = tiny_run.run(config, local, env=env)
  assert done.returncode == 0, done.stderr[-3000:]

  remote = storage.join(gcs_dir, "run")
  proc = tiny_run.start(config, remote, env=env, log_path=str(tmp_path / "remote.log"))
  try:
    _wait_for(storage.join(remote, "checkpoints", "4", "commit_success.txt"), proc)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(timeout=60)
  assert not storage.exists(storage.join(remote, "report.md"))
  again = tiny_run.run(config, remote, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stderr

  # Every output is in the bucket, nothing was written to a local "gs:" folder.
  for name in ("report.md", "summary.json", "domain_weights.png", "val_perplexity.png", "metrics.jsonl"):
    assert storage.getsize(storage.join(remote, name)) > 0, name
  assert any(n.startswith("events.out.tfevents") for n in storage.listdir(storage.join(remote, "tensorboard")))
  assert not os.path.exists(os.path.join(tiny_run.REPO, "gs:"))
  with open(os.path.join(local, "metrics.jsonl")) as f:
    expected = _metrics(f.read())
  assert _metrics(storage.read_text(storage.join(remote, "metrics.jsonl"))) == expected
  remote_summary = json.loads(storage.read_text(storage.join(remote, "summary.json")))
  with open(os.path.join(local, "summary.json")) as f:
    local_summary = json.load(f)
  for key in ("student_initial", "student_final", "teacher", "weights"):
    assert remote_summary[key] == local_summary[key], key


def test_prepared_dir_on_gs_fails_at_start_naming_gcsfuse(gcs_emulator, gcs_dir, tmp_path):
  assets = tiny_run.make_assets(str(tmp_path / "assets"))
  config = tiny_run.write_config_file(str(tmp_path / "c.py"), assets,
                                      **{"data.prepared_dir": storage.join(gcs_dir, "prepared")})
  r = tiny_run.run(config, str(tmp_path / "w"), env=_env(gcs_emulator.endpoint))
  assert r.returncode == 2
  assert "gcsfuse" in r.stderr and "Traceback" not in r.stderr
