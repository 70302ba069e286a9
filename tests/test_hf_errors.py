"""Bad checkpoints and bad calls fail early, naming the file, tensor or field and the fix.

Checkpoints here are written by our own exporter from random params (no torch needed);
test_hf_parity.py checks that exporter against transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from ddk_jax.hf import (HFCheckpointError, UnsupportedCheckpointError, check_vocab_compatible, export_hf_checkpoint,
                        load_hf_checkpoint, validate_checkpoint_dir)
from ddk_jax.hf import hf_export
from ddk_jax.hf.hf_import import read_safetensors_header
from ddk_jax.model import ModelConfig, param_shapes_and_axes

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def random_params(cfg, seed=0):
  # numpy, not model.init_params: eager jax.random per leaf costs seconds of compiles.
  rng = np.random.default_rng(seed)
  shapes, _ = param_shapes_and_axes(cfg)
  return jax.tree.map(lambda s: rng.normal(0, 0.05, s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


def make_ckpt(path, params, cfg=CFG, **kw):
  export_hf_checkpoint(params, cfg, path, dtype="float32", **kw)
  return path


def edit_config(path, **changes):
  conf = json.loads((path / "config.json").read_text())
  conf.update(changes)
  (path / "config.json").write_text(json.dumps(conf))


def test_validate_ok(params, tmp_path):
  cfg = validate_checkpoint_dir(make_ckpt(tmp_path / "ok", params))
  assert cfg == CFG
  validate_checkpoint_dir(tmp_path / "ok", expected_cfg=dataclasses.replace(CFG, remat="full"))


def test_missing_directory(tmp_path):
  with pytest.raises(HFCheckpointError, match="does not exist"):
    validate_checkpoint_dir(tmp_path / "nope")


def test_missing_config_json(params, tmp_path):
  path = make_ckpt(tmp_path / "c", params)
  (path / "config.json").unlink()
  with pytest.raises(HFCheckpointError, match=r"config\.json is missing"):
    validate_checkpoint_dir(path)


def test_missing_safetensors(params, tmp_path):
  path = make_ckpt(tmp_path / "c", params)
  (path / "model.safetensors").unlink()
  with pytest.raises(HFCheckpointError, match=r"model\.safetensors is missing"):
    load_hf_checkpoint(path)


def test_missing_shard_named(params, tmp_path):
  path = make_ckpt(tmp_path / "c", params, max_shard_size_bytes=50_000)
  shards = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
  assert len(shards) > 2
  (path / shards[1]).unlink()
  with pytest.raises(HFCheckpointError, match=re.escape(shards[1]) + r" is missing: "
                                            r"model\.safetensors\.index\.json maps tensors"):
    validate_checkpoint_dir(path)


def test_missing_tensor_named(params, tmp_path):
  path = make_ckpt(tmp_path / "c", params)
  # Drop one tensor by rewriting the file without it (safetensors' own numpy writer, fp32).
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(path / "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(HFCheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
    validate_checkpoint_dir(path)


def test_shape_mismatch_names_tensor_and_shapes(params, tmp_path):
  path = make_ckpt(tmp_path / "c", params)
  edit_config(path, intermediate_size=96)
  with pytest.raises(HFCheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
                                            r"\[128, 64\] in model\.safetensors, but config\.json implies \[96, 64\]"):
    load_hf_checkpoint(path)


def test_unsupported_architecture_named(params, tmp_path):
  path = make_ckpt(tmp_path / "c", params)
  edit_config(path, architectures=["GemmaForCausalLM"], model_type="gemma")
  with pytest.raises(UnsupportedCheckpointError, match=r"'GemmaForCausalLM' is not supported; supported: "
                                                       r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
    load_hf_checkpoint(path)


def test_unexpected_tensors_refused(params, tmp_path):
  path = make_ckpt(tmp_path / "c", params)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(path / "model.safetensors"))
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(UnsupportedCheckpointError, match=r"o_proj\.bias"):
    load_hf_checkpoint(path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickle_checkpoints_refused_with_conversion_hint(name, tmp_path):
  path = tmp_path / "c"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(hf_export.hf_config_from_model_config(CFG)))
  # Not a valid pickle either: the loader must refuse by name, never try to open it.
  (path / name).write_bytes(b"\x80\x04 definitely not to be unpickled")
  with pytest.raises(HFCheckpointError, match=r"only pickle weights .*safe_serialization=True"):
    validate_checkpoint_dir(path)
  with pytest.raises(HFCheckpointError, match=r"pickle checkpoint file.*never unpickles"):
    load_hf_checkpoint(path / name)


def test_expected_cfg_mismatch_lists_fields(params, tmp_path):
  path = make_ckpt(tmp_path / "c", params)
  wrong = dataclasses.replace(CFG, num_layers=3, rope_theta=500000.0)
  with pytest.raises(HFCheckpointError, match=r"num_layers: 2 vs 3; rope_theta: 10000\.0 vs 500000\.0"):
    load_hf_checkpoint(path, expected_cfg=wrong)


def test_expected_cfg_keeps_runtime_fields(params, tmp_path):
  path = make_ckpt(tmp_path / "c", params)
  want = dataclasses.replace(CFG, compute_dtype="bfloat16", param_dtype="bfloat16", remat="full")
  loaded, cfg = load_hf_checkpoint(path, expected_cfg=want)
  assert cfg == want and loaded["embed"].dtype == jax.numpy.bfloat16


def test_vocab_mismatch_between_checkpoints(params, tmp_path):
  teacher = validate_checkpoint_dir(make_ckpt(tmp_path / "t", params))
  student_cfg = dataclasses.replace(CFG, vocab_size=320)
  student = validate_checkpoint_dir(make_ckpt(tmp_path / "s", random_params(student_cfg, 1),
                                              student_cfg))
  with pytest.raises(ValueError, match="vocab mismatch: teacher vocab_size=256, student vocab_size=320"):
    check_vocab_compatible(teacher, student)


def test_export_refuses_non_empty_dir_and_overwrites_on_request(params, tmp_path):
  out = make_ckpt(tmp_path / "out", params)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    make_ckpt(out, params)
  make_ckpt(out, params, overwrite=True, max_shard_size_bytes=50_000)
  assert (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_export_leaves_nothing(params, tmp_path, monkeypatch):
  calls = []

  def flaky(x):
    calls.append(1)
    if len(calls) == 4:
      raise OSError("disk full (simulated)")
    return np.asarray(x)

  monkeypatch.setattr(hf_export, "_to_host", flaky)
  with pytest.raises(OSError, match="simulated"):
    make_ckpt(tmp_path / "out", params)
  assert os.listdir(tmp_path) == []  # neither out/ nor a staging directory


def test_export_param_shape_checked_before_writing(params, tmp_path):
  bad = jax.tree.map(lambda x: x, params)
  bad["layers"]["wq"] = bad["layers"]["wq"][:, :32]
  with pytest.raises(ValueError, match=r"param layers/wq has shape \(2, 32, 4, 16\)"):
    make_ckpt(tmp_path / "out", bad)
  assert os.listdir(tmp_path) == []


def test_exported_safetensors_header_is_standard(params, tmp_path):
  path = make_ckpt(tmp_path / "c", params)
  raw = (path / "model.safetensors").read_bytes()
  n = int.from_bytes(raw[:8], "little")
  assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}
  from safetensors import safe_open
  with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
    assert set(f.keys()) == set(read_safetensors_header(path / "model.safetensors"))
    np.testing.assert_array_equal(f.get_tensor("model.embed_tokens.weight"), np.asarray(params["embed"]))
