"""Hugging Face `config.json` <-> `ModelConfig`.

transformers 5 writes RoPE settings as `"rope_parameters": {"rope_theta": ..., "rope_type":
..., <scaling keys>}` and the storage dtype as `"dtype"`; older checkpoints (most of the
Hub) use top-level `rope_theta`, `rope_scaling` (with `type` or `rope_type`) and
`torch_dtype`.  Both forms are read; export writes the transformers-5 form.

Anything the model cannot compute exactly (an o_proj or MLP bias, another activation,
per-layer sliding windows, NTK/YaRN RoPE, quantized weights) is refused here, before any
weight is read, with an error that names the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ddk_jax.model import DTYPES, ModelConfig
from ddk_jax.rope import SUPPORTED_ROPE_TYPES

# architecture -> HF model_type.  Qwen1.5 checkpoints are Qwen2ForCausalLM in transformers.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

# ModelConfig fields that define the function the network computes (and the tensor
# shapes); the others (dtypes, remat, scan, attention_impl) are run-time choices.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
    "sliding_window",
)

_HF_TO_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


class UnsupportedCheckpointError(ValueError):
  """The checkpoint's architecture or settings cannot be represented by ddk_jax's model."""


def supported_architectures_text() -> str:
  return ", ".join(SUPPORTED_ARCHITECTURES) + " (Qwen1.5 checkpoints are Qwen2ForCausalLM)"


def architecture_of(config_json: Mapping[str, Any], where: str = "config.json") -> str:
  archs = config_json.get("architectures") or []
  if isinstance(archs, str):
    archs = [archs]
  if not archs:
    # Some hand-written configs only carry model_type; map it back when unambiguous.
    by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
    model_type = config_json.get("model_type")
    if model_type in by_type:
      return by_type[model_type]
    raise UnsupportedCheckpointError(
        f"{where}: no 'architectures' entry (model_type={model_type!r}); supported: "
        f"{supported_architectures_text()}.")
  if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedCheckpointError(
        f"{where}: architecture {archs if len(archs) != 1 else archs[0]!r} is not supported; supported: "
        f"{supported_architectures_text()}.")
  return archs[0]


def _rope_from_hf(c: Mapping[str, Any], where: str) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling-or-None) from either config form."""
  params = c.get("rope_parameters")
  if params is not None and not isinstance(params, Mapping):
    raise UnsupportedCheckpointError(f"{where}: rope_parameters must be a dict, got {params!r}.")
  if params and any(isinstance(v, Mapping) for v in params.values()):
    raise UnsupportedCheckpointError(
        f"{where}: per-layer-type rope_parameters {sorted(params)} are not supported (one RoPE for all layers).")
  # Priority as in transformers: rope_parameters, then the legacy rope_scaling dict;
  # rope_theta from inside the dict, then top level, then the 10000 default.
  scaling = dict(params) if params else dict(c.get("rope_scaling") or {})
  theta = scaling.pop("rope_theta", None)
  if theta is None:
    theta = c.get("rope_theta", 10000.0)
  rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
  scaling.pop("type", None)
  if scaling.get("partial_rotary_factor", 1.0) != 1.0 or c.get("partial_rotary_factor", 1.0) not in (None, 1.0):
    raise UnsupportedCheckpointError(f"{where}: partial_rotary_factor != 1 is not supported.")
  scaling.pop("partial_rotary_factor", None)
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise UnsupportedCheckpointError(
        f"{where}: RoPE type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)} "
        "(dynamic-NTK / YaRN / LongRoPE change attention beyond the frequencies).")
  if rope_type == "default":
    return float(theta), None
  if rope_type == "llama3":
    # transformers falls back to max_position_embeddings when the original length is absent.
    scaling.setdefault("original_max_position_embeddings", c.get("max_position_embeddings"))
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
      if scaling.get(key) is None:
        raise UnsupportedCheckpointError(f"{where}: llama3 RoPE scaling needs {key!r}.")
  elif scaling.get("factor") is None:
    raise UnsupportedCheckpointError(f"{where}: {rope_type} RoPE scaling needs 'factor'.")
  return float(theta), {"rope_type": rope_type, **scaling}


def _sliding_window_from_hf(c: Mapping[str, Any], arch: str, num_layers: int, where: str) -> int:
  if arch == "LlamaForCausalLM":
    return 0
  if arch == "MistralForCausalLM":
    if c.get("layer_types") and any(t != "sliding_attention" for t in c["layer_types"]) and c.get("sliding_window"):
      raise UnsupportedCheckpointError(
          f"{where}: layer_types {c['layer_types']} mixes attention kinds; ddk_jax applies one window to all layers.")
    return int(c.get("sliding_window") or 0)
  # Qwen2: the window applies only when use_sliding_window, and only to layers >= max_window_layers
  # (transformers derives `layer_types` from that when absent).
  window = c.get("sliding_window") if c.get("use_sliding_window", False) else None
  layer_types = c.get("layer_types")
  if layer_types is None:
    max_window_layers = int(c.get("max_window_layers", 28))
    layer_types = ["sliding_attention" if window is not None and i >= max_window_layers else "full_attention"
                   for i in range(num_layers)]
  kinds = set(layer_types)
  if kinds == {"full_attention"} or window is None:
    return 0
  if kinds == {"sliding_attention"}:
    return int(window)
  raise UnsupportedCheckpointError(
      f"{where}: use_sliding_window with max_window_layers={c.get('max_window_layers')} gives per-layer windows "
      f"({layer_types}); ddk_jax applies one attention pattern to all layers.")


def model_config_from_hf(config_json: Mapping[str, Any], where: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig for a Llama / Mistral / Qwen2 (Qwen1.5) HF config.json dict.

  `param_dtype` defaults to the checkpoint's storage dtype (`dtype` / `torch_dtype`), so a
  bf16 teacher stays bf16; `overrides` (any ModelConfig field) win over everything.
  """
  c = dict(config_json)
  arch = architecture_of(c, where)
  if c.get("quantization_config"):
    raise UnsupportedCheckpointError(f"{where}: quantized checkpoints are not supported (quantization_config is set).")
  act = c.get("hidden_act", c.get("hidden_activation", "silu"))
  if act not in ("silu", "swish"):
    raise UnsupportedCheckpointError(f"{where}: hidden_act={act!r}; ddk_jax's MLP is SwiGLU and needs 'silu'.")
  if c.get("mlp_bias", False):
    raise UnsupportedCheckpointError(f"{where}: mlp_bias=true is not supported (the model's MLP has no biases).")
  if arch == "LlamaForCausalLM" and c.get("attention_bias", False):
    raise UnsupportedCheckpointError(
        f"{where}: LlamaForCausalLM with attention_bias=true also has an o_proj bias, which ddk_jax's model "
        "does not have; only q/k/v biases (Qwen2-style) are supported.")
  # pretraining_tp > 1 only splits HF's eager matmuls into slices; the math is the same, so it is ignored.

  num_heads = int(c["num_attention_heads"])
  hidden = int(c["hidden_size"])
  head_dim = int(c.get("head_dim") or 0)
  if head_dim == hidden // num_heads and hidden % num_heads == 0:
    head_dim = 0  # derived; keeps configs that leave head_dim unset comparable
  num_layers = int(c["num_hidden_layers"])
  theta, scaling = _rope_from_hf(c, where)
  dtype = c.get("dtype", c.get("torch_dtype"))
  values = dict(
      vocab_size=int(c["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(c["intermediate_size"]),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
      head_dim=head_dim,
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
      attention_bias=arch == "Qwen2ForCausalLM",  # Qwen2 always has q/k/v biases, never an o_proj bias
      sliding_window=_sliding_window_from_hf(c, arch, num_layers, where),
      max_position_embeddings=int(c.get("max_position_embeddings") or 4096),
      initializer_range=float(c.get("initializer_range", 0.02)),
      param_dtype=_HF_TO_DTYPE.get(str(dtype), "float32"),
  )
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(f"unknown ModelConfig override(s) {unknown}; valid: {sorted(names)}")
  values.update(overrides)
  cfg = ModelConfig(**values)
  try:
    cfg.validate()
  except ValueError as e:
    raise UnsupportedCheckpointError(f"{where}: {e}") from e
  return cfg


def architecture_mismatches(a: ModelConfig, b: ModelConfig) -> list[str]:
  """'field: a vs b' for every architecture field that differs (head_dim compared resolved)."""
  out = []
  for name in ARCHITECTURE_FIELDS:
    va, vb = getattr(a, name), getattr(b, name)
    if name == "head_dim":
      va, vb = a.resolved_head_dim, b.resolved_head_dim
    elif name == "rope_scaling":
      va, vb = dict(va or {}) or None, dict(vb or {}) or None
    elif name in ("rope_theta", "rms_norm_eps"):
      va, vb = float(va), float(vb)
    if va != vb:
      out.append(f"{name}: {va!r} vs {vb!r}")
  return out


def hf_config_from_model_config(cfg: ModelConfig, architecture: str = "LlamaForCausalLM", *,
                                dtype: str = "bfloat16", bos_token_id: int | None = None,
                                eos_token_id: int | list[int] | None = None,
                                pad_token_id: int | None = None) -> dict[str, Any]:
  """A transformers-5 style config.json dict describing `cfg` as `architecture`.

  Refuses combinations the HF class cannot express exactly: q/k/v biases only exist in
  Qwen2 (Llama's attention_bias also adds an o_proj bias; Mistral has none), and a
  sliding window does not exist in Llama.
  """
  if architecture not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedCheckpointError(
        f"export architecture {architecture!r} is not supported; supported: {supported_architectures_text()}.")
  if dtype not in DTYPES:
    raise ValueError(f"export dtype {dtype!r} is not one of {sorted(DTYPES)}")
  if cfg.attention_bias and architecture != "Qwen2ForCausalLM":
    raise UnsupportedCheckpointError(
        f"the model has q/k/v biases (attention_bias=True); {architecture} cannot hold them exactly. "
        "Export as architecture='Qwen2ForCausalLM'.")
  if cfg.sliding_window and architecture == "LlamaForCausalLM":
    raise UnsupportedCheckpointError(
        f"the model uses sliding_window={cfg.sliding_window}; LlamaForCausalLM has no sliding window. "
        "Export as 'MistralForCausalLM' (or 'Qwen2ForCausalLM').")
  rope_parameters = {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}
  if cfg.rope_scaling:
    scaling = dict(cfg.rope_scaling)
    rope_parameters["rope_type"] = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    rope_parameters.update(scaling)
  out: dict[str, Any] = {
      "architectures": [architecture],
      "model_type": SUPPORTED_ARCHITECTURES[architecture],
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "initializer_range": cfg.initializer_range,
      "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "rope_parameters": rope_parameters,
      "attention_dropout": 0.0,
      "use_cache": True,
      "dtype": dtype,
      "bos_token_id": bos_token_id,
      "eos_token_id": eos_token_id,
      "pad_token_id": pad_token_id,
  }
  if architecture == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1, head_dim=cfg.resolved_head_dim)
  elif architecture == "MistralForCausalLM":
    out.update(head_dim=cfg.resolved_head_dim, sliding_window=cfg.sliding_window or None)
  else:
    if cfg.head_dim and cfg.head_dim != cfg.hidden_size // cfg.num_heads:
      # Qwen2 in transformers derives head_dim = hidden_size // num_attention_heads.
      raise UnsupportedCheckpointError(
          f"Qwen2ForCausalLM derives head_dim from hidden_size/num_heads; this model has head_dim={cfg.head_dim}.")
    out.update(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window or None,
               max_window_layers=0 if cfg.sliding_window else cfg.num_layers,
               layer_types=[("sliding_attention" if cfg.sliding_window else "full_attention")] * cfg.num_layers)
  return out
