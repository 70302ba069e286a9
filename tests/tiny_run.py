"""A tiny end-to-end experiment for tests of the training loop (checkpoints, resume, faults).

    assets = make_assets(tmp_dir)                 # corpus, tokenizer, prepared shards (once)
    cfg = tiny_config(assets, steps=8)            # a locked ConfigDict from base_config()
    path = write_config_file(tmp_dir / "c.py", assets, steps=8)   # for `python -m ddk_jax.main`

Everything is small enough that a run's cost is JAX import + compilation: 3 domains,
a 400-token BPE tokenizer, seq_len 32, batch 8, 1-layer student, 2-layer teacher.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

DOMAINS = ("short", "long", "mixed")


def make_assets(root: str) -> str:
  """Writes a 3-domain corpus and a tiny tokenizer under root and prepares the shards."""
  from ddk_jax.data import prepare, testing

  root = os.fspath(root)
  os.makedirs(root, exist_ok=True)
  tok = testing.make_tokenizer(os.path.join(root, "tok"))
  testing.write_jsonl(os.path.join(root, "short.jsonl"), testing.make_texts(80, "short", seed=1))
  testing.write_jsonl(os.path.join(root, "long.jsonl"),
                      testing.make_texts(40, "long", min_words=40, max_words=90, seed=2))
  testing.write_jsonl(os.path.join(root, "mixed.jsonl"), testing.make_texts(60, "mixed", seed=3))
  with open(os.path.join(root, "assets.json"), "w") as f:
    json.dump({"tokenizer": tok}, f)
  prepare.prepare(tiny_config(root).data, progress=False, log=None)
  return root


def tiny_config(assets: str, **overrides: Any):
  """The tiny experiment; `overrides` are dotted keys, e.g. {"checkpoint.every": 2}."""
  from ddk_jax.config_defaults import base_config, model_section
  from ddk_jax.data import testing

  with open(os.path.join(assets, "assets.json")) as f:
    tok = json.load(f)["tokenizer"]
  c = base_config()
  c.mode = "ddk"
  c.seed = 0
  c.steps = 8
  c.global_batch_size = 8
  c.data = testing.data_config(assets, [
      {"name": "short", "train": [os.path.join(assets, "short.jsonl")], "weight": 1.0},
      {"name": "long", "train": [os.path.join(assets, "long.jsonl")], "weight": 2.0},
      {"name": "mixed", "train": [os.path.join(assets, "mixed.jsonl")], "weight": 1.0},
  ], tok, seq_len=32, num_validation_docs=4)
  c.teacher.model = model_section(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2,
                                  num_heads=2, num_kv_heads=2, param_dtype="float32", compute_dtype="float32")
  c.student.model = model_section(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1,
                                  num_heads=2, num_kv_heads=1, param_dtype="float32", compute_dtype="float32")
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 2
  c.ddk.interval = 3
  c.ddk.eval_batch_size = 8
  c.checkpoint.every = 2
  c.checkpoint.keep = 100
  c.checkpoint.async_save = True
  c.logging.every = 1
  c.logging.tensorboard = False
  c.logging.progress_bar = False
  c.mesh.data = -1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def write_config_file(path: str, assets: str, **overrides: Any) -> str:
  """A configs/*.py-style file returning tiny_config(assets, **overrides)."""
  text = (
      "import sys\n"
      f"sys.path.insert(0, {TESTS!r})\n"
      "import tiny_run\n\n"
      "def get_config():\n"
      f"  return tiny_run.tiny_config({os.fspath(assets)!r}, **{overrides!r})\n")
  with open(path, "w") as f:
    f.write(text)
  return os.fspath(path)


# ---- running `python -m ddk_jax.main` in a subprocess ---------------------------------------


def env_for(num_devices: int = 1, **extra: str) -> dict:
  """The environment of a training subprocess: CPU, `num_devices` emulated devices."""
  flags = os.environ.get("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={num_devices}".strip())
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env.update(extra)
  return env


def main_command(config_path: str, workdir: str, *flags: str) -> list[str]:
  return [sys.executable, "-m", "ddk_jax.main", f"--config={config_path}", f"--workdir={workdir}", *flags]


def start(config_path: str, workdir: str, *flags: str, env: dict | None = None,
          log_path: str | None = None) -> subprocess.Popen:
  log = open(log_path or os.path.join(os.fspath(workdir) + ".log"), "ab")
  return subprocess.Popen(main_command(config_path, workdir, *flags), cwd=REPO, env=env or env_for(),
                          stdout=log, stderr=subprocess.STDOUT)


def run(config_path: str, workdir: str, *flags: str, env: dict | None = None, timeout: float = 240
        ) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(config_path, workdir, *flags), cwd=REPO, env=env or env_for(),
                        capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):
        rows.append(json.loads(line))
  return rows


def wait_for_train_step(workdir: str, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
  """Blocks until metrics.jsonl has the train row of `step` (the loop logs a step after it ran)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(r["kind"] == "train" and r["step"] >= step for r in metrics(workdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"the run exited with {proc.returncode} before step {step}")
    time.sleep(0.05)
  raise AssertionError(f"no train row for step {step} after {timeout} s")
