"""HF parameter names <-> ddk_jax params: the one mapping that import and export both use."""

from __future__ import annotations

import dataclasses

from ddk_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """How one of our params is made from HF tensors.

  Per layer, `ours = hf.reshape(split).transpose(perm)`; `hf_name` has `{i}` for the layer
  index when `stacked`.  HF linear weights are [out, in], ours [in, out] split by heads.
  """
  path: tuple[str, ...]
  hf_name: str
  hf_shape: tuple[int, ...]
  split: tuple[int, ...]
  perm: tuple[int, ...]
  stacked: bool

  def names(self, num_layers: int) -> list[str]:
    return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def param_mapping(cfg: ModelConfig) -> list[TensorMap]:
  """The HF <-> ours correspondence for every param of `cfg` (the single source for import and export)."""
  H, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  N, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  lay = "model.layers.{i}."
  out = [TensorMap(("embed",), "model.embed_tokens.weight", (V, H), (V, H), (0, 1), False)]
  layer_maps = [
      ("attn_norm", "input_layernorm.weight", (H,), (H,), (0,)),
      ("wq", "self_attn.q_proj.weight", (N * D, H), (N, D, H), (2, 0, 1)),
      ("wk", "self_attn.k_proj.weight", (K * D, H), (K, D, H), (2, 0, 1)),
      ("wv", "self_attn.v_proj.weight", (K * D, H), (K, D, H), (2, 0, 1)),
      ("wo", "self_attn.o_proj.weight", (H, N * D), (H, N, D), (1, 2, 0)),
      ("mlp_norm", "post_attention_layernorm.weight", (H,), (H,), (0,)),
      ("w_gate", "mlp.gate_proj.weight", (F, H), (F, H), (1, 0)),
      ("w_up", "mlp.up_proj.weight", (F, H), (F, H), (1, 0)),
      ("w_down", "mlp.down_proj.weight", (H, F), (H, F), (1, 0)),
  ]
  if cfg.attention_bias:
    layer_maps += [
        ("bq", "self_attn.q_proj.bias", (N * D,), (N, D), (0, 1)),
        ("bk", "self_attn.k_proj.bias", (K * D,), (K, D), (0, 1)),
        ("bv", "self_attn.v_proj.bias", (K * D,), (K, D), (0, 1)),
    ]
  out += [TensorMap(("layers", ours), lay + hf, hs, sp, pm, True) for ours, hf, hs, sp, pm in layer_maps]
  out.append(TensorMap(("final_norm",), "model.norm.weight", (H,), (H,), (0,), False))
  if not cfg.tie_word_embeddings:
    out.append(TensorMap(("lm_head",), "lm_head.weight", (V, H), (V, H), (1, 0), False))
  return out
