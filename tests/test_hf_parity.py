"""Parity with transformers (torch, CPU, fp32) for every supported architecture, plus
import -> export -> import round trips, sharded safetensors and mesh placement.

Every test builds a tiny random HF model in tmp_path (no downloads).  All weights,
including norms and biases, are randomized so a swapped or mis-transposed tensor shows.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ddk_jax import sharding as sharding_lib  # noqa: E402
from ddk_jax.hf import export_hf_checkpoint, load_hf_checkpoint  # noqa: E402
from ddk_jax.hf.hf_import import iter_hf_tensors  # noqa: E402
from ddk_jax.model import apply_logits  # noqa: E402

V, H, L = 256, 64, 2
BASE = dict(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4,
            num_key_value_heads=4, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (HF config class, model class, config kwargs)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "tinyllama_gqa": ("LlamaConfig", "LlamaForCausalLM",
                      dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=176)),
    "mistral_window_gt_seq": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=64)),
    "mistral_window_lt_seq": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=5)),
    "qwen2_tied_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE))),
    "llama_head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=32, num_key_value_heads=2)),
}


def make_hf_model(case: str, attn_impl: str = "eager", seed: int = 0):
  cfg_cls, model_cls, kw = CASES[case]
  config = getattr(transformers, cfg_cls)(**{**BASE, **kw})
  config._attn_implementation = attn_impl
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def save(model, path, **kw):
  model.save_pretrained(str(path), safe_serialization=True, **kw)
  return path


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


_JITTED: dict = {}


def our_logits(params, cfg, ids, positions=None, segment_ids=None) -> np.ndarray:
  ids = np.asarray(ids)
  if positions is None:
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  if segment_ids is None:
    segment_ids = np.ones_like(ids)
  # jit, one compiled function per config (cfg holds a dict, so it cannot be a static arg);
  # eager op-by-op dispatch is several times slower even for these tiny shapes.
  fn = _JITTED.get(repr(cfg))
  if fn is None:
    fn = _JITTED[repr(cfg)] = jax.jit(lambda p, i, pos, seg: apply_logits(p, cfg, i, pos, seg))
  out = fn(params, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32))
  return np.asarray(out)


def assert_logits_close(ours, ref):
  # "Within 1e-4 relative": elementwise against the reference's scale.
  err = np.max(np.abs(ours - ref))
  scale = np.max(np.abs(ref))
  assert err <= 1e-4 * scale, f"max abs err {err:.3e} vs logits scale {scale:.3e}"


def ids_for(seq=24, batch=2, seed=1):
  return np.random.default_rng(seed).integers(0, V, (batch, seq))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
  model = make_hf_model(case)
  params, cfg = load_hf_checkpoint(save(model, tmp_path / case), param_dtype="float32")
  assert cfg.compute_dtype == "float32"
  ids = ids_for()
  assert_logits_close(our_logits(params, cfg, ids), torch_logits(model, ids))


def test_mistral_small_window_matches_sdpa_and_matters(tmp_path):
  # transformers applies the window in its mask for every attention implementation.
  model = make_hf_model("mistral_window_lt_seq", attn_impl="sdpa")
  params, cfg = load_hf_checkpoint(save(model, tmp_path / "m"), param_dtype="float32")
  assert cfg.sliding_window == 5
  ids = ids_for()
  ref = torch_logits(model, ids)
  assert_logits_close(our_logits(params, cfg, ids), ref)
  no_window = our_logits(params, dataclasses.replace(cfg, sliding_window=0), ids)
  assert np.max(np.abs(no_window - ref)) > 1e-3  # the window is actually exercised


def test_llama3_scaling_matters(tmp_path):
  model = make_hf_model("llama3_rope")
  params, cfg = load_hf_checkpoint(save(model, tmp_path / "m"), param_dtype="float32")
  assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
  ids = ids_for()
  plain = our_logits(params, dataclasses.replace(cfg, rope_scaling=None), ids)
  assert np.max(np.abs(plain - torch_logits(model, ids))) > 1e-3


@pytest.mark.parametrize("old_rope", [
    {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    {"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_theta": 20000.0},
])
def test_old_style_config_json(old_rope, tmp_path):
  """config.json with top-level rope_theta / rope_scaling and torch_dtype (pre-transformers-5 checkpoints)."""
  path = save(make_hf_model("llama"), tmp_path / "m")
  conf = json.loads((path / "config.json").read_text())
  conf.pop("rope_parameters")
  conf.pop("dtype", None)
  conf.update(old_rope, torch_dtype="float32")
  (path / "config.json").write_text(json.dumps(conf))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
  params, cfg = load_hf_checkpoint(path)
  assert cfg.param_dtype == "float32" and cfg.rope_theta == old_rope["rope_theta"]
  ids = ids_for()
  assert_logits_close(our_logits(params, cfg, ids), torch_logits(model, ids))


def test_packed_row_matches_documents_alone(tmp_path):
  """HF has no packing: a packed row [doc A | doc B] must give each document's own logits."""
  model = make_hf_model("tinyllama_gqa")
  params, cfg = load_hf_checkpoint(save(model, tmp_path / "m"), param_dtype="float32")
  rng = np.random.default_rng(3)
  doc_a, doc_b = rng.integers(0, V, (1, 9)), rng.integers(0, V, (1, 15))
  row = np.concatenate([doc_a, doc_b], axis=1)
  positions = np.concatenate([np.arange(9), np.arange(15)])[None]
  segments = np.concatenate([np.full(9, 1), np.full(15, 2)])[None]
  packed = our_logits(params, cfg, row, positions, segments)
  assert_logits_close(packed[:, :9], torch_logits(model, doc_a))
  assert_logits_close(packed[:, 9:], torch_logits(model, doc_b))
  assert_logits_close(packed[:, 9:], our_logits(params, cfg, doc_b))


def _tree_equal(a, b):
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(x, y, err_msg=str(path))


@pytest.mark.parametrize("case,arch", [("llama", "LlamaForCausalLM"), ("qwen2_tied_bias", "Qwen2ForCausalLM"),
                                       ("mistral_window_lt_seq", "MistralForCausalLM")])
def test_roundtrip_exact_and_export_loads_in_transformers(case, arch, tmp_path):
  model = make_hf_model(case)
  src = save(model, tmp_path / "src")
  params, cfg = load_hf_checkpoint(src, param_dtype="float32")
  out = tmp_path / "exported"
  export_hf_checkpoint(params, cfg, out, architecture=arch, dtype="float32", bos_token_id=1, eos_token_id=2)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind
  params2, cfg2 = load_hf_checkpoint(out, param_dtype="float32")
  assert cfg2 == cfg
  _tree_equal(params, params2)
  # Every stored tensor is bit-identical to the original checkpoint's.
  original = dict(iter_hf_tensors(src))
  exported = dict(iter_hf_tensors(out))
  assert sorted(original) == sorted(exported)
  for name, x in original.items():
    np.testing.assert_array_equal(x, exported[name], err_msg=name)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
  assert type(reloaded).__name__ == arch
  ids = ids_for()
  assert_logits_close(our_logits(params, cfg, ids), torch_logits(reloaded, ids))
  gen = json.loads((out / "generation_config.json").read_text())
  assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2


def test_sharded_safetensors_roundtrip(tmp_path):
  model = make_hf_model("tinyllama_gqa")
  # transformers writes shards + index when the model exceeds max_shard_size.
  src = save(model, tmp_path / "src", max_shard_size="100KB")
  assert (src / "model.safetensors.index.json").exists()
  params, cfg = load_hf_checkpoint(src, param_dtype="float32")
  ids = ids_for()
  assert_logits_close(our_logits(params, cfg, ids), torch_logits(model, ids))
  out = tmp_path / "exported"
  export_hf_checkpoint(params, cfg, out, dtype="float32", max_shard_size_bytes=40_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 3 and all((out / s).exists() for s in shards)
  assert not (out / "model.safetensors").exists()
  params2, _ = load_hf_checkpoint(out, param_dtype="float32")
  _tree_equal(params, params2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert_logits_close(our_logits(params, cfg, ids), torch_logits(reloaded, ids))


def test_bf16_checkpoint(tmp_path):
  """bf16 safetensors (no numpy bf16 in safetensors' numpy API) import exactly and keep bf16 by default."""
  model = make_hf_model("qwen2_tied_bias").to(torch.bfloat16)
  src = save(model, tmp_path / "src")
  params, cfg = load_hf_checkpoint(src)
  assert cfg.param_dtype == "bfloat16" and params["embed"].dtype == jnp.bfloat16
  ref = model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(params["embed"], np.float32), ref)
  wq0 = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()  # [N*D, H]
  np.testing.assert_array_equal(np.asarray(params["layers"]["wq"][0], np.float32).reshape(H, -1), wq0.T)
  # fp32 import of bf16 weights is exact too; bf16 export of them is bit-identical.
  params32, cfg32 = load_hf_checkpoint(src, param_dtype="float32")
  np.testing.assert_array_equal(np.asarray(params32["embed"]), ref)
  export_hf_checkpoint(params32, cfg32, tmp_path / "out", architecture="Qwen2ForCausalLM", dtype="bfloat16")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
  for (n1, x1), (n2, x2) in zip(iter_hf_tensors(src), iter_hf_tensors(tmp_path / "out")):
    assert n1 == n2 and x1.dtype == x2.dtype
    np.testing.assert_array_equal(x1.view(np.uint16), x2.view(np.uint16), err_msg=n1)


def test_mesh_import_matches_single_device(tmp_path):
  """Placing directly onto a mesh (fsdp 4 x tensor 2 on conftest's 8 emulated devices) gives
  the same values, with the rule-derived shardings."""
  model = make_hf_model("qwen2_tied_bias")
  src = save(model, tmp_path / "src")
  single, cfg = load_hf_checkpoint(src, param_dtype="float32")
  tensor = 2 if jax.device_count() % 2 == 0 else 1
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": jax.device_count() // tensor, "tensor": tensor})
  rules = sharding_lib.DEFAULT_RULES
  sharded, cfg_mesh = load_hf_checkpoint(src, mesh=mesh, rules=rules, param_dtype="float32")
  assert cfg_mesh == cfg
  _tree_equal(single, sharded)
  wq = sharded["layers"]["wq"]
  assert isinstance(wq.sharding, NamedSharding)
  assert wq.sharding.spec == sharding_lib.logical_to_spec(("layers", "embed", "q_heads", "head_dim"), wq.shape,
                                                           mesh, rules)
  # Really split over every device, not replicated.
  assert len({str(s.index) for s in wq.addressable_shards}) == jax.device_count()
  # Logits from the sharded params equal the single-device ones.
  ids = ids_for()
  np.testing.assert_allclose(our_logits(sharded, cfg, ids), our_logits(single, cfg, ids), rtol=1e-5, atol=1e-5)


def test_export_gathers_sharded_params(tmp_path):
  model = make_hf_model("llama")
  src = save(model, tmp_path / "src")
  tensor = 2 if jax.device_count() % 2 == 0 else 1
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": jax.device_count() // tensor, "tensor": tensor})
  params, cfg = load_hf_checkpoint(src, mesh=mesh, param_dtype="float32")
  export_hf_checkpoint(params, cfg, tmp_path / "out", dtype="float32")
  for (n1, x1), (n2, x2) in zip(iter_hf_tensors(src), iter_hf_tensors(tmp_path / "out")):
    assert n1 == n2
    np.testing.assert_array_equal(x1, x2, err_msg=n1)


def test_tokenizer_files_exported(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
  tok.train_from_iterator(["hello world, distilled student"] * 20,
                          tokenizers.trainers.BpeTrainer(vocab_size=V, special_tokens=["<s>", "</s>"]))
  tok_file = tmp_path / "tokenizer.json"
  tok.save(str(tok_file))
  model = make_hf_model("llama")
  params, cfg = load_hf_checkpoint(save(model, tmp_path / "src"), param_dtype="float32")
  out = tmp_path / "out"
  export_hf_checkpoint(params, cfg, out, tokenizer_path=tok_file, bos_token_id=0, eos_token_id=1)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert hf_tok.bos_token == "<s>" and hf_tok.eos_token == "</s>"
  assert hf_tok("hello world")["input_ids"] == tok.encode("hello world").ids
  # A tokenizer directory is copied file by file.
  out2 = tmp_path / "out2"
  export_hf_checkpoint(params, cfg, out2, tokenizer_path=out)
  assert (out2 / "tokenizer.json").read_bytes() == tok_file.read_bytes()
  assert (out2 / "tokenizer_config.json").exists()
