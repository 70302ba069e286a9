"""The CPU fast paths of the model: blocked einsum attention and compute_dtype="auto"."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddk_jax import flops, model as model_lib
from ddk_jax.model import ModelConfig

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=1024)


def _packed_segments(b, s, seed):
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, s), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, s - 1), size=3, replace=False))
    seg[r] = np.searchsorted(cuts, np.arange(s), side="right") + 1
    seg[r, s - rng.integers(0, 5):] = 0  # padded tail
  return jnp.asarray(seg)


@pytest.mark.parametrize("s, n, kh, window", [
    (16, 4, 4, 0),     # one block
    (300, 4, 2, 0),    # two uneven blocks, GQA
    (520, 2, 1, 0),    # four blocks, MQA
    (300, 4, 4, 37),   # sliding window
])
def test_einsum_attention_matches_reference(s, n, kh, window):
  b, d = 2, 8
  ks = jax.random.split(jax.random.key(s + n), 3)
  q = jax.random.normal(ks[0], (b, s, n, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, s, kh, d), jnp.float32)
  v = jax.random.normal(ks[2], (b, s, kh, d), jnp.float32)
  mask = model_lib.attention_mask(_packed_segments(b, s, seed=s), window)
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  out = model_lib.attention(q, k, v, mask, "einsum")
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))
  g_ref = jax.grad(lambda *a: loss(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=mask, implementation="xla"), *a), argnums=(0, 1, 2))(q, k, v)
  g_out = jax.grad(lambda *a: loss(lambda q, k, v: model_lib.attention(q, k, v, mask, "einsum"), *a),
                   argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(g_out, g_ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


def test_einsum_attention_bf16_inputs_give_bf16_outputs():
  q = jnp.ones((1, 8, 2, 4), jnp.bfloat16)
  mask = model_lib.attention_mask(jnp.ones((1, 8), jnp.int32), 0)
  assert model_lib.attention(q, q, q, mask, "einsum").dtype == jnp.bfloat16


def test_model_attention_impls_agree():
  params = model_lib.init_params(TINY, jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 300)), jnp.int32)
  seg = _packed_segments(2, 300, seed=1)
  pos = jnp.broadcast_to(jnp.arange(300, dtype=jnp.int32), (2, 300))
  ref = model_lib.apply_logits(params, dataclasses.replace(TINY, attention_impl="xla"), ids, pos, seg)
  out = model_lib.apply_logits(params, dataclasses.replace(TINY, attention_impl="einsum"), ids, pos, seg)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_compute_dtype_auto_resolves_per_platform():
  assert model_lib.resolve_compute_dtype("auto", "cpu") == "float32"
  assert model_lib.resolve_compute_dtype("auto", "gpu") == "bfloat16"
  assert model_lib.resolve_compute_dtype("auto", "tpu") == "bfloat16"
  assert model_lib.resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"
  assert model_lib.resolve_compute_dtype("float32", "gpu") == "float32"
  assert model_lib.resolve_compute_dtype("auto") == model_lib.resolve_compute_dtype("auto", jax.default_backend())


def test_compute_dtype_auto_in_the_model():
  cfg = dataclasses.replace(TINY, compute_dtype="auto", param_dtype="bfloat16")
  cfg.validate()
  params = model_lib.init_params(cfg, jax.random.key(0))
  ids = jnp.zeros((1, 8), jnp.int32)
  pos = jnp.arange(8, dtype=jnp.int32)[None]
  seg = jnp.ones((1, 8), jnp.int32)
  hidden = model_lib.apply_hidden(params, cfg, ids, pos, seg)
  assert hidden.dtype == model_lib.DTYPES[model_lib.resolve_compute_dtype("auto")]
  assert flops.peak_flops_per_device("auto")[1]  # resolves before looking up a peak


@pytest.mark.parametrize("overrides, message", [
    ({"compute_dtype": "fp8"}, "compute_dtype"),
    ({"attention_impl": "flash"}, "attention_impl"),
])
def test_invalid_run_time_fields(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(TINY, **overrides).validate()


def test_remat_dots_keeps_the_projection_outputs():
  """remat="dots" saves the projections' outputs for the backward (their matmuls run in a
  custom VJP that remat policies cannot see; the outputs are named instead), so it keeps
  more than "full" (layer inputs only) and less than no remat."""
  import dataclasses

  import jax.numpy as jnp
  from jax._src.ad_checkpoint import saved_residuals

  from ddk_jax import model as model_lib

  cfg = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, param_dtype="float32", compute_dtype="float32")
  params = model_lib.init_params(cfg, jax.random.key(0))
  inputs = jnp.ones((2, 8), jnp.int32)
  positions = jnp.tile(jnp.arange(8), (2, 1))
  segments = jnp.ones((2, 8), jnp.int32)

  def saved(remat):
    c = dataclasses.replace(cfg, remat=remat)
    res = saved_residuals(lambda p: jnp.sum(model_lib.apply_hidden(p, c, inputs, positions, segments)), params)
    return sum(int(np.prod(r[0].shape)) for r in res)

  none, full, dots = saved("none"), saved("full"), saved("dots")
  assert full < dots < none
  # every layer keeps at least its q, k, v, gate and up outputs (head_dim 8): 2 x 8 tokens each
  per_layer = 2 * 8 * (cfg.num_heads * 8 + 2 * cfg.num_kv_heads * 8 + 2 * cfg.intermediate_size)
  assert dots - full >= cfg.num_layers * per_layer
