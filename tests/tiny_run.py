"""A tiny end-to-end experiment for tests of the training loop (checkpoints, resume, faults).

    assets = make_assets(tmp_dir)                 # corpus, tokenizer, prepared shards (once)
    cfg = tiny_config(assets, steps=8)            # a locked ConfigDict from base_config()
    path = write_config_file(tmp_dir / "c.py", assets, steps=8)   # for `python -m ddk_jax.main`

Everything is small enough that a run's cost is JAX import + compilation: 3 domains,
a 400-token BPE tokenizer, seq_len 32, batch 8, 1-layer student, 2-layer teacher.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
  import data_helpers as testing
  from ddk_jax.data import prepare

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
  import data_helpers as testing

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


def env_for(num_devices: int = 1, cache_dir: str | None = None, **extra: str) -> dict:
  """The environment of a training subprocess: CPU, `num_devices` emulated devices, and
  optionally a persistent compilation cache shared by the runs of a test."""
  # The device count goes through jax_num_cpu_devices, as in tests/conftest.py, so that
  # XLA_FLAGS (part of the compilation cache key) match the in-process runs'.
  flags = os.environ.get("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=flags, JAX_NUM_CPU_DEVICES=str(num_devices))
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=os.fspath(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(extra)
  return env


@contextlib.contextmanager
def compilation_cache(cache_dir: str):
  """A persistent compilation cache for in-process runs: repeated `trainer.train` calls
  (new closures, same programs) load their executables instead of recompiling."""
  import jax
  from jax._src import compilation_cache as cc

  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  for k, v in zip(keys, (os.fspath(cache_dir), 0, 0)):
    jax.config.update(k, v)
  cc.reset_cache()
  try:
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    cc.reset_cache()


def main_command(config_path: str, workdir: str, *flags: str) -> list[str]:
  return [sys.executable, "-m", "ddk_jax.main", f"--config={config_path}", f"--workdir={workdir}", *flags]


def start(config_path: str, workdir: str, *flags: str, env: dict | None = None,
          log_path: str | None = None) -> subprocess.Popen:
  with open(log_path or os.fspath(workdir) + ".log", "ab") as log:  # the child keeps its own handle
    return subprocess.Popen(main_command(config_path, workdir, *flags), cwd=REPO, env=env or env_for(),
                            stdout=log, stderr=subprocess.STDOUT)


def run(config_path: str, workdir: str, *flags: str, env: dict | None = None, timeout: float = 240
        ) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(config_path, workdir, *flags), cwd=REPO, env=env or env_for(),
                        capture_output=True, text=True, timeout=timeout)


def run_local_processes(argv_of, n: int, *, env: dict, timeout: float, what: str) -> list[str]:
  """Starts `n` local processes (`argv_of(i)` is process i's command line), waits for all of
  them within `timeout` seconds (killing any left), asserts each exited 0; returns their
  combined stdout/stderr in process order."""
  import pytest
  procs = [subprocess.Popen(argv_of(i), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(n)]
  deadline = time.monotonic() + timeout
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  except subprocess.TimeoutExpired:
    pytest.fail(f"{what} hung (> {timeout:.0f} s)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def result_line(out: str, prefix: str = "RESULT ") -> str:
  """The last line of a process's output that starts with `prefix`, without it."""
  lines = [line for line in out.splitlines() if line.startswith(prefix)]
  assert lines, out[-3000:]
  return lines[-1][len(prefix):]


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
    time.sleep(0.005)
  raise AssertionError(f"no train row for step {step} after {timeout} s")


# ---- reading a run back ---------------------------------------------------------------------

# Row fields that measure time, not what was computed.
TIMING_FIELDS = ("time", "tokens_per_s", "mfu")


def comparable_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl without its timing fields, in file order."""
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in metrics(workdir)]


def read_checkpoint(workdir: str, step: int) -> tuple[dict, dict]:
  """(state as a numpy tree, meta dict) of one checkpoint step, read with plain orbax."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  root = os.path.join(os.fspath(workdir), "checkpoints", str(step))
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(os.path.join(root, "state")).item_metadata.tree
  state = ckptr.restore(os.path.join(root, "state"),
                        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  with open(os.path.join(root, "meta", "metadata")) as f:
    meta = json.load(f)
  return state, meta


def committed_steps(workdir: str) -> list[int]:
  d = os.path.join(os.fspath(workdir), "checkpoints")
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and os.path.exists(os.path.join(d, n, "commit_success.txt")))


def assert_same_state(a: dict, b: dict) -> None:
  """Bit-identical trees (params, optimizer state, counters)."""
  import jax
  import numpy as np

  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb, "different tree structures"
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def copy_run(src: str, dst: str, *, keep_steps: list[int] | None = None) -> str:
  """A copy of a run directory, optionally with only some checkpoint steps."""
  shutil.copytree(src, dst)
  if keep_steps is not None:
    d = os.path.join(dst, "checkpoints")
    for n in os.listdir(d):
      if n.isdigit() and int(n) not in keep_steps:
        shutil.rmtree(os.path.join(d, n))
  return dst


# ---- one reference run shared by the in-process checkpoint and fault tests -----------------

# 8 steps on the emulated 8-device mesh (data x fsdp x tensor = 2 x 2 x 2); DDK updates at
# steps 0, 3, 6; checkpoints every 2 steps (all kept).
REFERENCE = {"steps": 8, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
             "checkpoint.every": 2, "ddk.interval": 3}


def shared_root(tmp_path_factory) -> str:
  """A directory shared by the test modules of one pytest session."""
  root = os.path.join(os.fspath(tmp_path_factory.getbasetemp()), "ddk_shared")
  os.makedirs(root, exist_ok=True)
  return root


def shared_assets(root: str) -> str:
  assets = os.path.join(root, "assets")
  if not os.path.exists(os.path.join(assets, "assets.json")):
    make_assets(assets)
  return assets


def reference_run(root: str, assets: str) -> str:
  """The uninterrupted REFERENCE run (made once per session, in-process)."""
  from ddk_jax import trainer

  workdir = os.path.join(root, "reference")
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    if os.path.exists(workdir):
      shutil.rmtree(workdir)
    trainer.train(tiny_config(assets, **REFERENCE), workdir)
  return workdir


@contextlib.contextmanager
def reference_env(tmp_path_factory, name: str):
  """A module's shared set-up for tests against the reference run: the shared assets, the
  reference run itself, a scratch directory, all under one persistent compilation cache."""
  root = shared_root(tmp_path_factory)
  with compilation_cache(os.path.join(root, "jax_cache")):
    assets = shared_assets(root)
    ref = reference_run(root, assets)
    yield {"assets": assets, "ref": ref, "tmp": str(tmp_path_factory.mktemp(name))}


def reference_config(env: dict, **overrides):
  """The reference run's config with `overrides` (dotted keys)."""
  return tiny_config(env["assets"], **{**REFERENCE, **overrides})


def local_math_task(root: str) -> str:
  """A one-task local task directory (ddk_math) built from a small demo corpus, once per session."""
  from ddk_jax.demo.corpus import ensure_demo_corpus
  from ddk_jax.downstream import local_tasks
  out = os.path.join(root, "local_tasks")
  if not os.path.exists(os.path.join(out, local_tasks.MANIFEST)):
    corpus = ensure_demo_corpus(os.path.join(root, "demo_corpus"), scale=0.05, vocab_size=512)["out_dir"]
    local_tasks.generate_local_tasks(out, corpus, tasks=["ddk_math"])
  return out
