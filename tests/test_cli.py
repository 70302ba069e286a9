"""The command-line entry points as processes: a tiny run through `python -m ddk_jax.main`,
its export through `python -m ddk_jax.export` (loaded back with transformers, same logits),
`python -m ddk_jax.data.prepare`, and the command-line errors: one or two lines naming the
key or file and the fix, exit status 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tiny_run

REPO = tiny_run.REPO


def _run(module: str, *args: str, cwd: str | None = None, env: dict | None = None, timeout: float = 240
         ) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env or tiny_run.env_for(),
                        capture_output=True, text=True, timeout=timeout)


def _assert_usage_error(p: subprocess.CompletedProcess, *needles: str, prog: str) -> str:
  err = p.stderr
  assert p.returncode == 2, f"rc={p.returncode}\n{p.stdout}\n{err}"
  assert "Traceback" not in err, err
  lines = [l for l in err.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith(f"{prog}: error: ")]
  assert len(errors) == 1 and len(lines) <= 2, err  # one or two lines, one of them the error
  for n in needles:
    assert n in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return tiny_run.shared_assets(tiny_run.shared_root(tmp_path_factory))


@pytest.fixture(scope="module")
def config_file(assets, tmp_path_factory):
  return tiny_run.write_config_file(str(tmp_path_factory.mktemp("cli_cfg") / "tiny.py"), assets)


# ---- a run, its export, and the data preparation, each as a process --------------------------------


@pytest.fixture(scope="module")
def finished_run(config_file, tmp_path_factory):
  """A 2-step run through `python -m ddk_jax.main`, overrides on the command line: (workdir, its stderr)."""
  root = tmp_path_factory.mktemp("cli_run")
  workdir = str(root / "run")
  env = tiny_run.env_for(1, cache_dir=str(root / "jax_cache"))
  p = tiny_run.run(config_file, workdir, "--config.steps=2", "--config.ddk.interval=2", "--config.checkpoint.every=1",
                   env=env)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "Done. Report:" in p.stdout
  return workdir, p.stderr


def test_main_runs_to_the_end(finished_run):
  workdir, _ = finished_run
  assert os.path.exists(os.path.join(workdir, "report.md"))
  rows = [r for r in tiny_run.metrics(workdir) if r["kind"] == "train"]
  assert [r["step"] for r in rows] == [1, 2]
  assert tiny_run.committed_steps(workdir) == [1, 2]


def test_main_logs_plain_progress_lines(finished_run):
  # logging.progress_bar=False (the tiny config's) and logging.every=1: one plain line per step.
  _, stderr = finished_run
  lines = [l for l in stderr.splitlines() if " step " in l and " tok/s" in l]
  assert len(lines) == 2, stderr[-3000:]
  assert "step 1/2 (50%)" in lines[0] and "loss " in lines[0] and "MFU " in lines[0] and "ETA " in lines[0]
  assert "step 2/2 (100%)" in lines[1] and "done in" in lines[1]


def test_export_from_another_cwd_matches_transformers(finished_run, tmp_path):
  finished_run, _ = finished_run
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = tmp_path / "hf"
  env = tiny_run.env_for(1)
  env.pop("PYTHONPATH")  # the installed package, from a directory outside the repository
  p = _run("ddk_jax.export", f"--workdir={finished_run}", f"--out={out}", "--dtype=float32", cwd=str(tmp_path),
           env=env)
  assert p.returncode == 0, p.stdout + p.stderr[-3000:]
  assert f"exported to {out}" in p.stdout
  assert "HF export hf: " in p.stderr and "done in" in p.stderr  # progress lines (stderr is not a terminal)
  assert (out / "config.json").exists() and (out / "tokenizer.json").exists()

  import jax
  from ddk_jax import checkpointing, sharding
  from ddk_jax.model import apply_logits

  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  cfg, params = checkpointing.restore_student_params(finished_run, mesh, sharding.DEFAULT_RULES)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
  pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  ours = np.asarray(jax.jit(lambda p, i, q, s: apply_logits(p, cfg, i, q, s))(params, ids, pos, np.ones_like(ids)))

  model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  with torch.no_grad():
    ref = model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
  err, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
  assert err <= 1e-4 * scale, f"max abs err {err:.3e} vs logits scale {scale:.3e}"


def test_prepare_as_a_process(config_file, tmp_path):
  prepared = tmp_path / "prepared"
  p = _run("ddk_jax.data.prepare", f"--config={config_file}", f"--config.data.prepared_dir={prepared}",
           cwd=str(tmp_path), timeout=120)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "[prepare] done" in p.stdout
  manifest = json.loads((prepared / "manifest.json").read_text())
  assert sorted(manifest["domains"]) == sorted(tiny_run.DOMAINS)


# ---- command-line errors ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad_configs")
  files = {
      "syntax.py": "def get_config(:\n  return None\n",
      "raises.py": "import os\n\nSETTING = int(os.environ.get('NOPE', 'x'))\n",
      "no_get_config.py": "def config():\n  return {}\n",
      "get_config_raises.py": "def get_config():\n  return {}['missing']\n",
      "returns_none.py": "def get_config():\n  pass\n",
      # A small config like base_config(): a nested section and typed leaves (no JAX import).
      "small.py": textwrap.dedent("""
          import ml_collections

          def get_config():
            c = ml_collections.ConfigDict()
            c.steps = 10
            c.ddk = ml_collections.ConfigDict({"interval": 100, "alpha": 0.5})
            c.logging = ml_collections.ConfigDict({"progress_bar": True})
            c.lock()
            return c
          """),
  }
  for name, text in files.items():
    (d / name).write_text(text)
  return d


MAIN = "ddk_jax.main"


@pytest.mark.parametrize("override, needles", [
    ("--config.nonexistent=1", ["'nonexistent'", "docs/config.md"]),
    ("--config.ddk.intervall=5", ["'ddk.intervall'", "did you mean --config.ddk.interval?"]),
    ("--config.dk.interval=5", ["'dk.interval'", "did you mean --config.ddk.interval?"]),
    ("--config.stepz=5", ["'stepz'", "did you mean --config.steps?"]),
    ("--config.steps=abc", ["--config.steps=abc", "int", "'steps'"]),
    ("--config.ddk.alpha=x", ["--config.ddk.alpha=x", "float"]),
    ("--config.logging.progress_bar=maybe", ["progress_bar", "true or false"]),
    ("--config.steps.x=1", ["'steps' is a value", "--config.steps="]),
])
def test_bad_override(bad_files, tmp_path, override, needles):
  p = _run(MAIN, f"--config={bad_files / 'small.py'}", f"--workdir={tmp_path / 'w'}", override, timeout=60)
  _assert_usage_error(p, *needles, prog=MAIN)
  assert not (tmp_path / "w").exists()


def test_misspelled_key_of_the_real_base_config(tmp_path):
  p = _run(MAIN, "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}", "--config.optimizer.learning_ratee=1",
           timeout=60)
  _assert_usage_error(p, "did you mean --config.optimizer.learning_rate?", prog=MAIN)


@pytest.mark.parametrize("name, needles", [
    ("missing.py", ["missing.py", "does not exist", "--config=configs/demo.py"]),
    ("syntax.py", ["syntax.py, line 1", "syntax"]),
    ("raises.py", ["raises.py (line 3)", "ValueError", "invalid literal"]),
    ("no_get_config.py", ["no_get_config.py", "no get_config()"]),
    ("get_config_raises.py", ["get_config_raises.py", "get_config() raised KeyError at line 2"]),
    ("returns_none.py", ["returns_none.py", "returned None"]),
])
def test_bad_config_file(bad_files, name, needles):
  p = _run(MAIN, f"--config={bad_files / name}", "--workdir=/nonexistent/w", timeout=60)
  _assert_usage_error(p, *needles, prog=MAIN)


def test_main_other_usage_errors(bad_files):
  small = f"--config={bad_files / 'small.py'}"
  _assert_usage_error(_run(MAIN, timeout=60), "--config is required", prog=MAIN)
  _assert_usage_error(_run(MAIN, small, "--workdirr=x", timeout=60), "did you mean --workdir?", prog=MAIN)
  _assert_usage_error(_run(MAIN, small, "stray", timeout=60), "unexpected arguments stray", prog=MAIN)
  _assert_usage_error(_run(MAIN, "--config.steps=3", timeout=60), "needs a config file", prog=MAIN)


@pytest.mark.parametrize("module", ["ddk_jax.main", "ddk_jax.data.prepare"])
def test_help_points_to_the_config_docs(module):
  p = _run(module, "--help", timeout=60)
  assert "docs/config.md" in p.stdout + p.stderr
  assert "Traceback" not in p.stderr


PREPARE = "ddk_jax.data.prepare"


def test_prepare_errors(bad_files):
  _assert_usage_error(_run(PREPARE, timeout=60), "--config is required", "--config=configs/demo.py", prog=PREPARE)
  _assert_usage_error(_run(PREPARE, f"--config={bad_files / 'small.py'}", timeout=60), "no `data` section",
                      prog=PREPARE)
  _assert_usage_error(_run(PREPARE, "--config=configs/demo.py", "--config.data.seq_lenn=8", timeout=60),
                      "did you mean --config.data.seq_len?", prog=PREPARE)
  _assert_usage_error(_run(PREPARE, f"--config={bad_files / 'syntax.py'}", timeout=60), "syntax.py, line 1",
                      prog=PREPARE)


EXPORT = "ddk_jax.export"


def test_export_errors(finished_run, tmp_path):
  finished_run, _ = finished_run
  out = f"--out={tmp_path / 'out'}"
  _assert_usage_error(_run(EXPORT, out, timeout=60), "--workdir is required", prog=EXPORT)
  _assert_usage_error(_run(EXPORT, f"--workdir={finished_run}", out, "--max_shard_size=abc", timeout=60),
                      "--max_shard_size=abc", "5GB", prog=EXPORT)
  _assert_usage_error(_run(EXPORT, f"--workdir={finished_run}", out, "--step=abc", timeout=60), "--step", prog=EXPORT)
  not_a_run = tmp_path / "not_a_run"
  not_a_run.mkdir()
  p = _run(EXPORT, f"--workdir={not_a_run}", out, timeout=120)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert f"--workdir={not_a_run} is not a ddk_jax run" in p.stderr
  p = _run(EXPORT, f"--workdir={finished_run}", out, "--step=7", timeout=120)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert "--step=7" in p.stderr and "committed steps: 1, 2" in p.stderr
  assert not (tmp_path / "out").exists()
