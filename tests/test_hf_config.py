"""HF config.json <-> ModelConfig: both RoPE forms, dtypes, per-architecture quirks, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ddk_jax.hf import check_vocab_compatible, hf_config_from_model_config, model_config_from_hf
from ddk_jax.hf.hf_config import UnsupportedCheckpointError
from ddk_jax.model import ModelConfig

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "head_dim": 16, "dtype": "bfloat16",
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_llama_fields():
  cfg = model_config_from_hf(LLAMA)
  assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (256, 64, 128, 2)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim) == (4, 2, 16)
  assert cfg.head_dim == 0  # equal to hidden/heads: left derived
  assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
  assert cfg.rms_norm_eps == 1e-5 and not cfg.tie_word_embeddings and not cfg.attention_bias
  assert cfg.sliding_window == 0 and cfg.param_dtype == "bfloat16"


def test_rope_parameters_and_legacy_forms_agree():
  new = dict(LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3})
  old = {k: v for k, v in LLAMA.items() if k not in ("rope_parameters", "dtype")}
  old.update(rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3}, torch_dtype="bfloat16")
  a, b = model_config_from_hf(new), model_config_from_hf(old)
  assert a == b
  assert a.rope_theta == 500000.0 and a.rope_scaling == {"rope_type": "llama3", **LLAMA3}


def test_llama3_original_length_defaults_to_max_positions():
  scaling = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
  cfg = model_config_from_hf(dict(LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, **scaling}))
  assert cfg.rope_scaling["original_max_position_embeddings"] == 2048  # as transformers does


def test_defaults_when_keys_absent():
  minimal = {k: LLAMA[k] for k in ("architectures", "vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads")}
  cfg = model_config_from_hf(minimal)
  assert cfg.num_kv_heads == 4 and cfg.rope_theta == 10000.0 and cfg.param_dtype == "float32"
  assert not cfg.tie_word_embeddings


def test_overrides_win():
  cfg = model_config_from_hf(LLAMA, param_dtype="float32", compute_dtype="bfloat16", remat="full")
  assert (cfg.param_dtype, cfg.compute_dtype, cfg.remat) == ("float32", "bfloat16", "full")
  with pytest.raises(ValueError, match="unknown ModelConfig override"):
    model_config_from_hf(LLAMA, not_a_field=1)


def test_explicit_head_dim_kept():
  cfg = model_config_from_hf(dict(LLAMA, head_dim=32))
  assert cfg.head_dim == 32 and cfg.resolved_head_dim == 32


def _qwen2(**kw):
  c = dict(LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True)
  for k in ("attention_bias", "mlp_bias", "head_dim"):
    c.pop(k)
  c.update(kw)
  return c


def test_qwen2_has_qkv_bias_and_window_flags():
  cfg = model_config_from_hf(_qwen2(use_sliding_window=False, sliding_window=4096, max_window_layers=28))
  assert cfg.attention_bias and cfg.tie_word_embeddings and cfg.sliding_window == 0
  # All layers windowed (max_window_layers=0) maps to one window.
  qwen = _qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=0)
  assert model_config_from_hf(qwen).sliding_window == 8
  # Window only on some layers: refused with the reason.
  with pytest.raises(UnsupportedCheckpointError, match="per-layer windows"):
    model_config_from_hf(_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1))
  # Explicit layer_types (transformers 5 writes them) are honoured.
  full = ["full_attention"] * 2
  assert model_config_from_hf(_qwen2(use_sliding_window=True, sliding_window=8, layer_types=full)).sliding_window == 0


def test_mistral_window():
  c = dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096)
  c.pop("attention_bias")
  assert model_config_from_hf(c).sliding_window == 4096
  assert model_config_from_hf(dict(c, sliding_window=None)).sliding_window == 0


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["GPTNeoXForCausalLM"]}, r"'GPTNeoXForCausalLM' is not supported; supported: LlamaForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "o_proj bias"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}}, "RoPE type 'dynamic'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
])
def test_refusals_name_the_key(change, match):
  with pytest.raises(UnsupportedCheckpointError, match=match):
    model_config_from_hf(dict(LLAMA, **change), where="ckpt/config.json")


TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("arch,changes", [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3},
                          "head_dim": 32}),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": True}),
    ("MistralForCausalLM", {"sliding_window": 16}),
    ("Qwen2ForCausalLM", {"attention_bias": True, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}),
    ("Qwen2ForCausalLM", {"attention_bias": True, "sliding_window": 16}),
])
def test_export_config_round_trips_and_loads_in_transformers(arch, changes, tmp_path):
  transformers = pytest.importorskip("transformers")
  cfg = dataclasses.replace(TINY, **changes)
  d = hf_config_from_model_config(cfg, arch, dtype="float32", bos_token_id=1, eos_token_id=2)
  assert "rope_parameters" in d and d["dtype"] == "float32"
  back = model_config_from_hf(d)
  assert back == dataclasses.replace(cfg, param_dtype="float32")
  (tmp_path / "config.json").write_text(json.dumps(d))
  hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
  assert type(hf).__name__ == arch.replace("ForCausalLM", "Config")
  assert hf.num_key_value_heads == cfg.num_kv_heads and hf.tie_word_embeddings == cfg.tie_word_embeddings
  assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
  assert (getattr(hf, "sliding_window", None) or 0) == cfg.sliding_window
  # Reading transformers' own serialization of that config gives the same ModelConfig.
  assert model_config_from_hf(hf.to_dict()) == back


def test_export_config_refuses_what_the_class_cannot_hold():
  with pytest.raises(UnsupportedCheckpointError, match="Qwen2ForCausalLM"):
    hf_config_from_model_config(dataclasses.replace(TINY, attention_bias=True), "LlamaForCausalLM")
  with pytest.raises(UnsupportedCheckpointError, match="MistralForCausalLM"):
    hf_config_from_model_config(dataclasses.replace(TINY, sliding_window=8), "LlamaForCausalLM")
  with pytest.raises(UnsupportedCheckpointError, match="'GPT2LMHeadModel' is not supported"):
    hf_config_from_model_config(TINY, "GPT2LMHeadModel")


def test_vocab_compatibility():
  a = TINY
  assert check_vocab_compatible(a, dataclasses.replace(a, hidden_size=32, num_heads=2, num_kv_heads=1)) == 256
  with pytest.raises(ValueError, match="teacher vocab_size=256, student vocab_size=300"):
    check_vocab_compatible(a, dataclasses.replace(a, vocab_size=300))
  # Same tokenizer, different padding (as Qwen1.5-14B vs 1.8B): compare over the shared ids.
  assert check_vocab_compatible(a, dataclasses.replace(a, vocab_size=300), tokenizer_vocab_size=250) == 256
  with pytest.raises(ValueError, match="exceeds"):
    check_vocab_compatible(a, dataclasses.replace(a, vocab_size=300), tokenizer_vocab_size=280)
