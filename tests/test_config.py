"""Shipped configs load and validate; each invalid value fails at start naming its key."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from ddk_jax.config_validation import ConfigError, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", ["demo", "tinyllama", "qwen1_5"])
@pytest.mark.parametrize("devices", [1, 8])
def test_shipped_configs_validate(name, devices):
  cfg = load_config(name)
  if name != "demo":
    with cfg.unlocked():
      cfg.teacher.path = "/models/teacher"
      cfg.student.path = "/models/student"
    cfg.global_batch_size = 256
  validate_config(cfg, devices)


def test_demo_skewed_mixture():
  """configs/demo.py:skewed changes only the domains' weights (the same corpus and files)."""
  spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  uniform, skewed = module.get_config(), module.get_config("skewed")
  assert [d["weight"] for d in uniform.data.domains] == [1.0] * 5
  weights = {d["name"]: d["weight"] for d in skewed.data.domains}
  assert weights == {"records": 0.05, "math": 0.10, "code": 0.20, "docstrings": 0.25, "prose": 0.40}
  assert [dict(d, weight=1.0) for d in skewed.data.domains] == list(uniform.data.domains)
  validate_config(skewed, 1)
  with pytest.raises(ValueError, match="unknown mixture; use one of uniform, skewed"):
    module.get_config("skewd")


def test_paper_pair_shapes():
  cfg = load_config("tinyllama")
  assert (cfg.teacher.model.num_layers, cfg.teacher.model.hidden_size) == (40, 5120)  # Llama-2-13B
  assert (cfg.student.model.num_layers, cfg.student.model.hidden_size, cfg.student.model.num_kv_heads) == (22, 2048, 4)
  assert cfg.ddk.interval == 1000 and cfg.ddk.alpha == 0.5 and cfg.data.num_validation_docs == 500


def _demo(**overrides):
  cfg = load_config("demo")
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.mark.parametrize("overrides, devices, message", [
    ({"steps": 0}, 1, "steps=0"),
    ({"steps": -5}, 1, "steps=-5"),
    ({"ddk.interval": 0}, 1, "ddk.interval"),
    ({"mesh.data": 3}, 8, "mesh"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, 8, "product"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, 8, "only one axis"),
    ({"global_batch_size": 12}, 8, "global_batch_size=12 is not divisible by data-parallel size 8"),
    ({"global_batch_size": 16, "optimizer.grad_accum": 4}, 8, "grad_accum=4"),
    ({"student.model.vocab_size": 8192}, 1, "teacher.model.vocab_size=4096 < student.model.vocab_size=8192"),
    ({"mode": "distill"}, 1, "mode='distill'"),
    ({"ddk.alpha": 1.5}, 1, "ddk.alpha"),
    ({"loss.temperature": 0.0}, 1, "loss.temperature"),
    ({"loss.impl": "fast"}, 1, "loss.impl"),
    ({"optimizer.learning_rate": -1.0}, 1, "optimizer.learning_rate"),
    ({"student.model.num_kv_heads": 3}, 1, "student.model.num_kv_heads"),
    ({"teacher.source": "s3"}, 1, "teacher.source"),
    ({"teacher.source": "hf", "teacher.pretrain_steps": 0, "teacher.path": ""}, 1, "teacher.path is empty"),
    ({"student.source": "random"}, 1, "student.pretrain_steps=60 needs student.source='workdir'"),
    ({"ddk.floor": 0.3}, 1, "ddk.floor"),
    ({"ddk.eval_max_rows": -1}, 1, "ddk.eval_max_rows=-1: must be >= 0"),
])
def test_config_errors_name_the_key(overrides, devices, message):
  with pytest.raises(ConfigError) as e:
    validate_config(_demo(**overrides), devices)
  assert message in str(e.value)


def test_unknown_key_and_bad_flag_fail_at_start(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for flag, message in (("--config.stepz=5", "stepz"), ("--config.steps=abc", "steps"),
                        ("--config.optimizer.lr=1", "lr")):
    out = subprocess.run([sys.executable, "-m", "ddk_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
                          flag], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
  assert not os.listdir(tmp_path)  # nothing was written


def test_mesh_mismatch_fails_from_cli(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "ddk_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
                        "--config.mesh.data=4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "mesh" in out.stderr and "devices" in out.stderr, out.stderr[-2000:]


def test_compilation_cache_setting(tmp_path):
  """The CLI's persistent compilation cache: on in the given directory (every compile is
  cached), off with "", and a directory that cannot be created only warns."""
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  code = textwrap.dedent(f"""
      import jax
      from ddk_jax.main import enable_compilation_cache
      assert enable_compilation_cache("") is None
      assert enable_compilation_cache({str(blocker / "sub")!r}) is None
      assert jax.config.jax_compilation_cache_dir in (None, "")
      path = enable_compilation_cache({str(tmp_path / "cache")!r})
      assert path == {str(tmp_path / "cache")!r} and jax.config.jax_compilation_cache_dir == path
      assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
      jax.jit(lambda x: x * 3 + 1)(jax.numpy.ones(4)).block_until_ready()
      print("OK")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
  assert "cannot be created" in out.stderr and "compilation_cache_dir" in out.stderr
  assert os.listdir(tmp_path / "cache")  # the jitted function was written to the cache
