"""Chunked (custom-VJP) CE + KD loss vs the naive reference: values, gradients, dtypes, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddk_jax import chunked_loss, losses

B, S, H, HT, V = 3, 37, 16, 24, 53  # 111 tokens: not a multiple of any chunk size used


def make_case(seed=0, b=B, s=S, h=H, ht=HT, v=V, dtype=jnp.float32):
  # numpy RNG: eager jax.random compiles per shape, which dominates a small test.
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  mask = rng.random((b, s)) > 0.2
  mask[0, -5:] = False  # padded tail
  targets = np.where(mask, rng.integers(0, v, (b, s)), -1).astype(np.int32)  # garbage at padding
  return dict(
    hs=jnp.asarray(normal(b, s, h), dtype),
    ws=jnp.asarray(normal(h, v) * (3 / np.sqrt(h)), dtype),
    ht=jnp.asarray(normal(b, s, ht), dtype),
    wt=jnp.asarray(normal(ht, v) * (3 / np.sqrt(ht)), dtype),
    targets=jnp.asarray(targets), mask=jnp.asarray(mask),
    g_ce=jnp.asarray(normal(b, s)), g_kl=jnp.asarray(normal(b, s)),
  )


def weighted(fn, c, teacher, **kw):
  """sum(g_ce * ce) + sum(g_kl * kl): arbitrary cotangents for both outputs."""
  def f(hs, ws, ht, wt):
    if not teacher:
      ht = wt = None
    ce, kl = fn(hs, ws, ht, wt, c["targets"], c["mask"], **kw)
    return jnp.sum(c["g_ce"] * ce) + jnp.sum(c["g_kl"] * kl), (ce, kl)
  return f


def assert_close(actual, desired, tol):
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * max(1.0, np.abs(desired).max()))


@pytest.mark.parametrize("temperature,teacher,chunk_size", [
  (0.7, True, 16),  # c = 5 positions per chunk, 8 chunks, 3 padded positions
  (2.0, True, 1024),  # one chunk holding everything
  (3.0, True, 2),  # fewer tokens than rows: one position per chunk
  (1.0, False, 64),
])
def test_token_losses_values_and_grads_match_naive(temperature, teacher, chunk_size):
  c = make_case(seed=chunk_size + int(10 * temperature))
  args = (c["hs"], c["ws"], c["ht"], c["wt"])
  naive = weighted(losses.kd_token_losses, c, teacher, temperature=temperature)
  chunked = weighted(chunked_loss.chunked_kd_token_losses, c, teacher,
                     temperature=temperature, chunk_size=chunk_size)
  vg = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
  (_, (ce0, kl0)), g0 = vg(naive)(*args)
  (_, (ce1, kl1)), g1 = vg(chunked)(*args)
  assert ce1.dtype == kl1.dtype == jnp.float32 and ce1.shape == (B, S)
  assert_close(ce1, ce0, 1e-5)
  assert_close(kl1, kl0, 1e-5)
  assert np.all(np.asarray(ce1)[~np.asarray(c["mask"])] == 0)
  if not teacher:
    np.testing.assert_array_equal(kl1, 0.0)
  for a, d in zip(g1[:2], g0[:2]):  # student hidden and head
    assert a.dtype == d.dtype and a.shape == d.shape
    assert_close(a, d, 1e-5)
  for g, x in zip(g1[2:], args[2:]):  # frozen teacher: zeros of the right shape and dtype
    assert g.shape == x.shape and g.dtype == x.dtype
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("temperature,gamma,teacher", [
  (2.0, 0.5, True),
  (1.0, 2.0, True),
  (2.0, 5.0, False),  # no teacher: gamma has nothing to weigh
])
def test_loss_sum_values_and_grads_match_naive(temperature, gamma, teacher):
  c = make_case(seed=7)
  args = (c["hs"], c["ws"], c["ht"], c["wt"])
  count = jnp.sum(c["mask"])

  def naive(hs, ws, ht, wt):
    if not teacher:
      ht = wt = None
    ce, kl = losses.kd_token_losses(hs, ws, ht, wt, c["targets"], c["mask"],
                                    temperature=temperature)
    return (jnp.sum(ce) + gamma * jnp.sum(kl)) / count, (ce, kl)

  def fused(hs, ws, ht, wt):
    if not teacher:
      ht = wt = None
    total, toks = chunked_loss.chunked_kd_loss_sum(
      hs, ws, ht, wt, c["targets"], c["mask"], temperature=temperature, gamma=gamma,
      chunk_size=32)
    return total / count, toks

  vg = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
  (l0, (ce0, kl0)), g0 = vg(naive)(*args)
  (l1, (ce1, kl1)), g1 = vg(fused)(*args)
  assert_close(l1, l0, 1e-5)
  assert_close(ce1, ce0, 1e-5)
  assert_close(kl1, kl0, 1e-5)
  for a, d in zip(g1[:2], g0[:2]):
    assert_close(a, d, 1e-5)
  np.testing.assert_array_equal(g1[2], 0.0)  # frozen teacher
  np.testing.assert_array_equal(g1[3], 0.0)
  assert g1[2].shape == c["ht"].shape and g1[3].shape == c["wt"].shape

  if temperature == 1.0:  # once: without differentiation (eval path) the same values
    l2, (ce2, _) = jax.jit(fused)(*args)
    assert_close(l2, l0, 1e-5)
    assert_close(ce2, ce0, 1e-5)


def test_bf16_inputs_run_and_stay_close():
  c = make_case(seed=11, dtype=jnp.bfloat16)
  args = (c["hs"], c["ws"], c["ht"], c["wt"])
  args32 = tuple(a.astype(jnp.float32) for a in args)  # the same bf16-rounded numbers
  f = weighted(chunked_loss.chunked_kd_token_losses, c, True, temperature=2.0, chunk_size=16)
  ref = weighted(losses.kd_token_losses, c, True, temperature=2.0)
  (_, (ce, kl)), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(*args)
  (_, (ce0, kl0)), g0 = jax.jit(jax.value_and_grad(ref, argnums=(0, 1), has_aux=True))(*args32)
  assert ce.dtype == kl.dtype == jnp.float32
  # Logits accumulate in fp32, so the values match the fp32 loss of the rounded inputs.
  assert_close(ce, ce0, 1e-4)
  assert_close(kl, kl0, 1e-4)
  for a, d in zip(g, g0):
    assert a.dtype == jnp.bfloat16
    assert_close(a, d, 3e-2)  # logit gradients are rounded to bf16 before the matmuls

  fused = jax.jit(jax.grad(lambda *a: chunked_loss.chunked_kd_loss_sum(
    *a, c["targets"], c["mask"], temperature=2.0, gamma=0.5, chunk_size=16)[0], argnums=(0, 1)))
  gf = fused(*args)
  assert gf[0].dtype == gf[1].dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(gf[0], np.float32)))


def test_qwen_sized_vocab_forward_and_grad():
  v = 151_936
  c = make_case(seed=13, b=2, s=5, h=32, ht=40, v=v)
  args = (c["hs"], c["ws"], c["ht"], c["wt"])
  f = weighted(chunked_loss.chunked_kd_token_losses, c, True, temperature=1.0)  # default chunk
  ref = weighted(losses.kd_token_losses, c, True, temperature=1.0)
  (_, (ce, kl)), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(*args)
  (_, (ce0, kl0)), g0 = jax.jit(jax.value_and_grad(ref, argnums=(0, 1), has_aux=True))(*args)
  assert_close(ce, ce0, 1e-5)
  assert_close(kl, kl0, 1e-5)
  assert_close(g[0], g0[0], 1e-5)
  assert_close(g[1], g0[1], 1e-5)


def test_argument_errors():
  c = make_case(seed=1)
  with pytest.raises(ValueError, match="both"):
    chunked_loss.chunked_kd_token_losses(c["hs"], c["ws"], c["ht"], None, c["targets"], c["mask"],
                                         temperature=1.0)
  with pytest.raises(ValueError, match="vocab"):
    chunked_loss.chunked_kd_loss_sum(c["hs"], c["ws"], c["ht"], c["wt"][:, :-1], c["targets"],
                                     c["mask"], temperature=1.0, gamma=1.0)


def test_default_chunk_size():
  assert chunked_loss.default_chunk_size(32_000) == 1024
  assert chunked_loss.default_chunk_size(32_768) == 1024
  assert chunked_loss.default_chunk_size(151_936) == 256
  assert chunked_loss.default_chunk_size(8_192) == 4096
  assert chunked_loss.default_chunk_size(256) == 8192
  assert chunked_loss.default_chunk_size(10**7) == 256


def _temp_bytes(fn, *shapes):
  return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_never_holds_a_full_tokens_by_vocab_buffer():
  """Compile-only check: the temporaries stay far below one fp32 [tokens, V] buffer."""
  b, s, h, v, chunk = 4, 1024, 32, 8192, 256
  sd = jax.ShapeDtypeStruct
  shapes = (sd((b, s, h), jnp.float32), sd((h, v), jnp.float32),
            sd((b, s, h), jnp.float32), sd((h, v), jnp.float32),
            sd((b, s), jnp.int32), sd((b, s), jnp.bool_))

  def loss(impl, hs, ws, ht, wt, tgt, m):
    if impl == "naive":
      ce, kl = losses.kd_token_losses(hs, ws, ht, wt, tgt, m, temperature=2.0)
      return jnp.sum(ce) + 0.5 * jnp.sum(kl)
    if impl == "tokens":
      ce, kl = chunked_loss.chunked_kd_token_losses(hs, ws, ht, wt, tgt, m, temperature=2.0,
                                                    chunk_size=chunk)
      return jnp.sum(ce) + 0.5 * jnp.sum(kl)
    return chunked_loss.chunked_kd_loss_sum(hs, ws, ht, wt, tgt, m, temperature=2.0, gamma=0.5,
                                            chunk_size=chunk)[0]

  full = b * s * v * 4  # one fp32 [tokens, V] buffer: 128 MiB
  block = chunk * v * 4  # one fp32 [chunk, V] block: 8 MiB
  grad = lambda impl: jax.grad(functools.partial(loss, impl), argnums=(0, 1))
  naive = _temp_bytes(grad("naive"), *shapes)
  assert naive >= 2 * full  # the reference really does materialise the logits
  for form in ("tokens", "sum"):
    chunked = _temp_bytes(grad(form), *shapes)
    # A few live [chunk, V] blocks plus the [H, V] head-gradient accumulator.
    assert chunked < 6 * block + 2 * h * v * 4 < full / 2, (form, chunked, block, full)
