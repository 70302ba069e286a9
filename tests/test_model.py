"""Model shapes, dtypes, masking (causal and packed segments), scan/remat equivalence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddk_jax import model as model_lib
from ddk_jax.model import ModelConfig, Transformer

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=64)


def _inputs(cfg, b=2, s=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, s)), jnp.int32)
  pos = jnp.tile(jnp.arange(s, dtype=jnp.int32), (b, 1))
  seg = jnp.ones((b, s), jnp.int32)
  return ids, pos, seg


@pytest.mark.parametrize("overrides", [
    {},
    {"num_kv_heads": 1},  # MQA
    {"num_kv_heads": 4, "attention_bias": True, "tie_word_embeddings": True},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "sliding_window": 4},
    {"head_dim": 16},
])
def test_shapes_and_dtypes(overrides):
  cfg = dataclasses.replace(TINY, **overrides)
  m = Transformer(cfg, rngs=nnx.Rngs(0))
  ids, pos, seg = _inputs(cfg)
  logits = m(ids, pos, seg)
  assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
  assert m.hidden_states(ids, pos, seg).shape == (2, 12, cfg.hidden_size)
  assert m.head_weight().shape == (cfg.hidden_size, cfg.vocab_size)
  assert np.all(np.isfinite(np.asarray(logits)))
  n = sum(x.size for x in jax.tree.leaves(m.param_dict()))
  assert n == cfg.num_params()


def test_bf16_compute_dtype_and_param_dtype():
  cfg = dataclasses.replace(TINY, compute_dtype="bfloat16", param_dtype="bfloat16")
  m = Transformer(cfg, rngs=nnx.Rngs(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(m.param_dict()))
  ids, pos, seg = _inputs(cfg)
  assert m.hidden_states(ids, pos, seg).dtype == jnp.bfloat16
  assert m(ids, pos, seg).dtype == jnp.float32  # logits accumulate in fp32


def test_params_carry_logical_axes():
  m = Transformer(TINY, rngs=nnx.Rngs(0))
  state = nnx.state(m, nnx.Param)
  axes = jax.tree.map(lambda v: v.get_metadata()["axes"], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert axes.to_pure_dict()["layers"]["wq"] == ("layers", "embed", "q_heads", "head_dim")
  shapes = jax.tree.map(lambda v: v.shape, m.param_dict())
  flat_axes = jax.tree.leaves(axes.to_pure_dict(), is_leaf=lambda x: isinstance(x, tuple))
  for a, s in zip(flat_axes, jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))):
    assert len(a) == len(s)


def test_causal_masking():
  m = Transformer(TINY, rngs=nnx.Rngs(1))
  ids, pos, seg = _inputs(TINY)
  base = np.asarray(m(ids, pos, seg))
  changed = ids.at[:, 7:].set((ids[:, 7:] + 5) % TINY.vocab_size)
  out = np.asarray(m(changed, pos, seg))
  np.testing.assert_array_equal(out[:, :7], base[:, :7])
  assert np.abs(out[:, 7:] - base[:, 7:]).max() > 1e-3


def test_packed_segments_are_independent():
  """A document packed after another gives the logits it gives alone (positions restart)."""
  m = Transformer(TINY, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(3)
  doc_a = rng.integers(0, TINY.vocab_size, 5)
  doc_b = rng.integers(0, TINY.vocab_size, 7)
  packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None], jnp.int32)
  pos = jnp.asarray(np.concatenate([np.arange(5), np.arange(7)])[None], jnp.int32)
  seg = jnp.asarray(np.array([1] * 5 + [2] * 7)[None], jnp.int32)
  out = np.asarray(m(packed, pos, seg))
  alone = np.asarray(m(jnp.asarray(doc_b[None], jnp.int32), jnp.arange(7)[None], jnp.ones((1, 7), jnp.int32)))
  np.testing.assert_allclose(out[0, 5:], alone[0], rtol=1e-5, atol=1e-5)
  # Changing document A does not touch document B's logits.
  other = packed.at[0, :5].set((packed[0, :5] + 1) % TINY.vocab_size)
  np.testing.assert_array_equal(np.asarray(m(other, pos, seg))[0, 5:], out[0, 5:])


def test_scan_unrolled_and_remat_agree():
  m = Transformer(TINY, rngs=nnx.Rngs(4))
  params = m.param_dict()
  ids, pos, seg = _inputs(TINY)
  ref = model_lib.apply_logits(params, TINY, ids, pos, seg)
  for kw in ({"scan_layers": False}, {"remat": "full"}, {"remat": "dots", "scan_layers": False}):
    cfg = dataclasses.replace(TINY, **kw)
    np.testing.assert_allclose(model_lib.apply_logits(params, cfg, ids, pos, seg), ref, rtol=1e-5, atol=1e-5)

  def loss(p, cfg):
    return jnp.mean(model_lib.apply_logits(p, cfg, ids, pos, seg) ** 2)
  g_ref = jax.grad(loss)(params, TINY)
  g_remat = jax.grad(loss)(params, dataclasses.replace(TINY, remat="full"))
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
    ({"hidden_size": 30}, "head_dim"),
    ({"compute_dtype": "float8"}, "compute_dtype"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"num_layers": 0}, "num_layers"),
])
def test_invalid_model_config(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(TINY, **overrides).validate()
