"""Llama-family decoder-only transformer (Llama 1/2/3, TinyLlama, Mistral, Qwen1.5/2).

The math is written once as pure functions over a param dict (`apply_hidden`,
`head_weight`) so the jitted train step works on plain pytrees; `Transformer` is the Flax
NNX module that owns the params (with logical axis metadata) and calls the same
functions.  Per-layer params are stacked on a leading `layers` axis, so scanned and
unrolled execution share one param layout (and one checkpoint format).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from ddk_jax import rope
from ddk_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}
REMAT_POLICIES = ("none", "full", "dots")
# compute_dtype "auto": the matmul input dtype that is fastest on the platform the model
# runs on (see resolve_compute_dtype and docs/performance.md).
AUTO = "auto"
AUTO_COMPUTE_DTYPES = {"cpu": "float32"}  # every other platform (gpu, tpu, ...): bfloat16


def resolve_compute_dtype(compute_dtype: str, platform: str | None = None) -> str:
  """The dtype name `compute_dtype` stands for on `platform` (default: JAX's default backend).

  `"auto"` is bfloat16 (fp32 accumulation) on GPU/TPU, whose matrix units run bf16 several
  times faster than fp32, and float32 on CPU: without AVX512-BF16/AMX (the development
  machine) XLA's bf16 matmuls are no faster than fp32 ones and the converts around them
  cost extra, so fp32 compute is the faster choice there.  Other names pass through.
  """
  if compute_dtype != AUTO:
    return compute_dtype
  platform = platform or jax.default_backend()
  return AUTO_COMPUTE_DTYPES.get(platform, "bfloat16")


def compute_dtype_of(cfg: "ModelConfig"):
  """The jnp dtype the model's matmul inputs and activations use (resolves "auto")."""
  return DTYPES[resolve_compute_dtype(cfg.compute_dtype)]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 4096
  hidden_size: int = 256
  intermediate_size: int = 688
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0  # 0: hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v bias (Qwen1.5 / Qwen2)
  sliding_window: int = 0  # 0: full causal attention (Mistral v0.1 uses 4096)
  max_position_embeddings: int = 4096
  initializer_range: float = 0.02
  param_dtype: str = "float32"
  compute_dtype: str = "float32"  # or "auto": bfloat16 on GPU/TPU, float32 on CPU
  remat: str = "none"  # none | full | dots
  scan_layers: bool = True
  # "": per platform (einsum on CPU, jax.nn.dot_product_attention elsewhere); "einsum" | "xla" | "cudnn"
  attention_impl: str = ""

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(names)}")
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = dict(d["rope_scaling"])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if d["rope_scaling"] is not None:
      d["rope_scaling"] = dict(d["rope_scaling"])
    return d

  def validate(self, prefix: str = "model") -> None:
    def bad(key, why):
      raise ValueError(f"{prefix}.{key}: {why}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      if int(getattr(self, key)) <= 0:
        bad(key, f"must be a positive integer, got {getattr(self, key)}")
    if self.num_heads % self.num_kv_heads:
      bad("num_kv_heads",
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA/MQA)")
    if not self.head_dim and self.hidden_size % self.num_heads:
      bad("head_dim",
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim explicitly")
    if self.resolved_head_dim % 2:
      bad("head_dim", f"RoPE needs an even head dim, got {self.resolved_head_dim}")
    if self.param_dtype not in DTYPES:
      bad("param_dtype", f"{self.param_dtype!r} is not one of {sorted(DTYPES)}")
    if self.compute_dtype not in DTYPES and self.compute_dtype != AUTO:
      bad("compute_dtype", f"{self.compute_dtype!r} is not one of {sorted(DTYPES) + [AUTO]}")
    if self.attention_impl not in ATTENTION_IMPLS:
      bad("attention_impl", f"{self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if self.remat not in REMAT_POLICIES:
      bad("remat", f"{self.remat!r} is not one of {REMAT_POLICIES}")
    rope.inverse_frequencies(self.resolved_head_dim, self.rope_theta, self.rope_scaling)

  def num_params(self, include_embedding: bool = True) -> int:
    h, f, d = self.hidden_size, self.intermediate_size, self.resolved_head_dim
    attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.attention_bias:
      attn += d * (self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * h * f + 2 * h
    total = self.num_layers * per_layer + h
    if include_embedding:
      total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
    elif not self.tie_word_embeddings:
      total += self.vocab_size * h  # the LM head is a matmul, count it
    return total


def param_shapes_and_axes(cfg: ModelConfig) -> tuple[dict, dict]:
  """(shapes, logical axes) for every parameter; the single source of the param layout."""
  L, H, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  N, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  layers = {
      "attn_norm": ((L, H), ("layers", "norm")),
      "wq": ((L, H, N, D), ("layers", "embed", "q_heads", "head_dim")),
      "wk": ((L, H, K, D), ("layers", "embed", "kv_heads", "head_dim")),
      "wv": ((L, H, K, D), ("layers", "embed", "kv_heads", "head_dim")),
      "wo": ((L, N, D, H), ("layers", "q_heads", "head_dim", "embed")),
      "mlp_norm": ((L, H), ("layers", "norm")),
      "w_gate": ((L, H, F), ("layers", "embed", "mlp")),
      "w_up": ((L, H, F), ("layers", "embed", "mlp")),
      "w_down": ((L, F, H), ("layers", "mlp", "embed")),
  }
  if cfg.attention_bias:
    layers["bq"] = ((L, N, D), ("layers", "q_heads", "head_dim"))
    layers["bk"] = ((L, K, D), ("layers", "kv_heads", "head_dim"))
    layers["bv"] = ((L, K, D), ("layers", "kv_heads", "head_dim"))
  table = {
      "embed": ((V, H), ("vocab", "embed")),
      "layers": layers,
      "final_norm": ((H,), ("norm",)),
  }
  if not cfg.tie_word_embeddings:
    table["lm_head"] = ((H, V), ("embed", "vocab"))
  is_entry = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)
  shapes = jax.tree.map(lambda e: e[0], table, is_leaf=is_entry)
  axes = jax.tree.map(lambda e: e[1], table, is_leaf=is_entry)
  return shapes, axes


def logical_axes(cfg: ModelConfig) -> dict:
  return param_shapes_and_axes(cfg)[1]


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
  """Random init as HF does it: N(0, initializer_range) weights, ones for norms, zero biases."""
  shapes, _ = param_shapes_and_axes(cfg)
  dtype = DTYPES[cfg.param_dtype]
  paths, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(paths))
  leaves = []
  for (path, shape), k in zip(paths, keys):
    name = path[-1].key
    if name.endswith("norm"):
      leaves.append(jnp.ones(shape, dtype))
    elif name in ("bq", "bk", "bv"):
      leaves.append(jnp.zeros(shape, dtype))
    else:
      leaves.append((cfg.initializer_range * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


PROJECTION = "projection"  # checkpoint name of every projection's output (remat="dots" keeps them)


def _dot(equation: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """A projection written as an einsum whose contracted letters are the trailing ones of
  `x` and the leading ones of `w` ("bsh,hnd->bsnd", "bsnd,ndh->bsh", ...).

  Inputs in the compute dtype, fp32 accumulation (exact accumulation everywhere; the fast
  bf16 path on CPU), result back in the compute dtype.
  """
  operands, out = equation.split("->")
  xs, ws = operands.split(",")
  k = len(set(xs) & set(ws))
  if not (k and xs[-k:] == ws[:k] and out == xs[:-k] + ws[k:]):
    raise ValueError(f"_dot: {equation!r} is not a projection (trailing x dims contracted with leading w dims)")
  # Named, because remat policies cannot see the matmul inside the custom VJP: "dots" saves these.
  return checkpoint_name(_linear(x.astype(dtype), w.astype(dtype), k), PROJECTION)


def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  acc = jnp.promote_types(a.dtype, jnp.float32)
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=acc).astype(a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x: jax.Array, w: jax.Array, k: int) -> jax.Array:
  """x [..., K1..Kk] . w [K1..Kk, N...] as one 2-D matmul [T, K] @ [K, N].

  The gradient is spelled out (custom VJP) as 2-D matmuls over the flattened tokens, the
  weight gradient's operands in the order measured fastest. Left to autodiff, XLA:CPU
  fuses the elementwise backward (SiLU, residual adds) into transposed copies of the
  activation gradients for the weight-gradient matmuls, which made the MLP backward at
  the kd_step benchmark's student shapes about 1.7x slower. Same matmuls as autodiff,
  so the same values.
  """
  kdim = math.prod(w.shape[:k])
  y = _matmul(x.reshape(-1, kdim), w.reshape(kdim, -1), (1, 0))
  return y.reshape(x.shape[:-k] + w.shape[k:])


def _linear_fwd(x, w, k):
  return _linear(x, w, k), (x, w)


def _linear_bwd(k, residuals, g):
  x, w = residuals
  kdim = math.prod(w.shape[:k])
  x2, w2 = x.reshape(-1, kdim), w.reshape(kdim, -1)
  g2 = g.reshape(-1, w2.shape[1]).astype(x.dtype)
  dx = _matmul(g2, w2, (1, 1))  # [T, N] . [K, N]^T
  if x2.shape[1] <= g2.shape[1]:
    dw = _matmul(g2, x2, (0, 0)).T  # [N, K] then a transpose of the (small) result
  else:
    dw = _matmul(x2, g2, (0, 0))
  return dx.reshape(x.shape), dw.astype(w.dtype).reshape(w.shape)


_linear.defvjp(_linear_fwd, _linear_bwd)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  acc = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(acc)
  normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (weight.astype(acc) * normed).astype(x.dtype)


def attention_mask(segment_ids: jax.Array, sliding_window: int) -> jax.Array:
  """[B, 1, S, S] boolean: causal, within the same packed segment, optional window."""
  s = segment_ids.shape[1]
  idx = jnp.arange(s)
  causal = idx[:, None] >= idx[None, :]
  if sliding_window:
    causal &= (idx[:, None] - idx[None, :]) < sliding_window
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & causal[None])[:, None]


ATTENTION_IMPLS = ("", "einsum", "xla", "cudnn")
_ATTENTION_BLOCK = 128  # query rows per block of the einsum attention (see below)


def _einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked softmax attention as plain batched matmuls, skipping key blocks causality masks.

  q [B, S, N, D], k/v [B, S, K, D] (GQA: N = K * G), mask [B, 1, S, S] (causal, same
  segment, optional window).  Heads are moved in front once so both matmuls are
  canonical batched GEMMs; scores, softmax and the matmuls run in fp32 (bf16 inputs are
  upcast: on CPU bf16 batched matmuls are slower than fp32 ones; float64 stays float64).
  The queries are cut into blocks of ~128 rows and block i only meets the keys up to its
  last row: every later key is masked by causality, so this is exact, and at S = 256 it
  does 3/4 of the full S x S work (S = 2048: 36/64).
  """
  b, s, n, d = q.shape
  kh = k.shape[2]
  g = n // kh
  out_dtype = q.dtype
  ct = jnp.promote_types(q.dtype, jnp.float32)
  q = (q.astype(ct) * jnp.asarray(d ** -0.5, ct)).reshape(b, s, kh, g, d).transpose(0, 2, 3, 1, 4)
  k = k.astype(ct).transpose(0, 2, 1, 3)  # [B, K, S, D]
  v = v.astype(ct).transpose(0, 2, 1, 3)
  mask = mask[:, :, None]  # [B, 1, 1, S, S]
  num_blocks = max(1, min(8, s // _ATTENTION_BLOCK))
  bounds = [i * s // num_blocks for i in range(num_blocks + 1)]
  outs = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q[:, :, :, lo:hi], k[:, :, :hi], preferred_element_type=ct)
    scores = jnp.where(mask[..., lo:hi, :hi], scores, jnp.finfo(ct).min)
    probs = jax.nn.softmax(scores, axis=-1)
    outs.append(jnp.einsum("bkgqs,bksd->bkgqd", probs, v[:, :, :hi], preferred_element_type=ct))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)  # [B, K, G, S, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, n, d).astype(out_dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "") -> jax.Array:
  """Causal (packed-segment) attention; `impl` is ModelConfig.attention_impl.

  "" picks per platform: the einsum attention above on CPU (fastest there), else
  `jax.nn.dot_product_attention` (cuDNN on GPU where it applies, XLA otherwise).
  """
  if impl == "einsum" or (impl == "" and jax.default_backend() == "cpu"):
    return _einsum_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl or None)


def _layer(cfg: ModelConfig, inv_freq, x, p, positions, mask):
  dt = compute_dtype_of(cfg)
  h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
  q = _dot("bsh,hnd->bsnd", h, p["wq"], dt)
  k = _dot("bsh,hkd->bskd", h, p["wk"], dt)
  v = _dot("bsh,hkd->bskd", h, p["wv"], dt)
  if cfg.attention_bias:
    q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
  q = rope.apply_rope(q, positions, inv_freq)
  k = rope.apply_rope(k, positions, inv_freq)
  with jax.named_scope("attention"):
    attn = attention(q, k, v, mask, cfg.attention_impl)
  x = x + _dot("bsnd,ndh->bsh", attn, p["wo"], dt)
  x = constrain(x, ("batch", "length", "act_embed"))
  h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
  with jax.named_scope("mlp"):
    gate = _dot("bsh,hf->bsf", h, p["w_gate"], dt)
    up = _dot("bsh,hf->bsf", h, p["w_up"], dt)
    x = x + _dot("bsf,fh->bsh", jax.nn.silu(gate) * up, p["w_down"], dt)
  return constrain(x, ("batch", "length", "act_embed"))


def apply_hidden(params: Mapping[str, Any], cfg: ModelConfig, inputs: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array) -> jax.Array:
  """Final hidden states [B, S, H] (after the final RMSNorm), in the compute dtype."""
  dt = compute_dtype_of(cfg)
  inv_freq = rope.inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
  # Gather from a table replicated over the vocab axis: a gather from a vocab-sharded
  # table has no efficient SPMD partitioning (XLA would replicate it anyway, noisily).
  table = constrain(params["embed"], (None, "act_embed"))
  x = jnp.take(table, inputs, axis=0).astype(dt)
  x = constrain(x, ("batch", "length", "act_embed"))
  mask = attention_mask(segment_ids, cfg.sliding_window)

  def layer(x, p):
    return _layer(cfg, inv_freq, x, p, positions, mask)

  if cfg.remat == "full":
    layer = jax.checkpoint(layer)
  elif cfg.remat == "dots":
    layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(PROJECTION)))

  if cfg.scan_layers:
    x, _ = jax.lax.scan(lambda c, p: (layer(c, p), None), x, params["layers"])
  else:
    for i in range(cfg.num_layers):
      x = layer(x, jax.tree.map(lambda a: a[i], params["layers"]))
  return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def head_weight(params: Mapping[str, Any], cfg: ModelConfig) -> jax.Array:
  """The [H, V] output projection (the embedding transposed when tied)."""
  return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def apply_logits(params, cfg: ModelConfig, inputs, positions, segment_ids) -> jax.Array:
  hidden = apply_hidden(params, cfg, inputs, positions, segment_ids)
  return jnp.einsum("bsh,hv->bsv", hidden, head_weight(params, cfg).astype(hidden.dtype),
                    preferred_element_type=jnp.float32)


class Transformer(nnx.Module):
  """NNX module owning the params; each `nnx.Param` carries its logical `axes`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, params: Mapping[str, Any] | None = None):
    cfg.validate()
    self.cfg = cfg
    if params is None:
      params = init_params(cfg, (rngs or nnx.Rngs(0)).params())
    axes = logical_axes(cfg)
    wrap = lambda v, a: nnx.Param(v, axes=a)
    self.embed = wrap(params["embed"], axes["embed"])
    self.layers = nnx.Dict({k: wrap(params["layers"][k], axes["layers"][k]) for k in axes["layers"]})
    self.final_norm = wrap(params["final_norm"], axes["final_norm"])
    if not cfg.tie_word_embeddings:
      self.lm_head = wrap(params["lm_head"], axes["lm_head"])

  def param_dict(self) -> dict:
    return nnx.state(self, nnx.Param).to_pure_dict()

  def hidden_states(self, inputs, positions, segment_ids):
    return apply_hidden(self.param_dict(), self.cfg, inputs, positions, segment_ids)

  def head_weight(self):
    return head_weight(self.param_dict(), self.cfg)

  def __call__(self, inputs, positions, segment_ids):
    return apply_logits(self.param_dict(), self.cfg, inputs, positions, segment_ids)
