"""Naive CE + KD loss vs a float64 numpy reference; per-domain sums; finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddk_jax import losses


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_token_losses(z_s, z_t, targets, mask, t):
  """float64 reference of the loss contract (docs/loss.md)."""
  z_s = np.asarray(z_s, np.float64)
  valid = np.asarray(mask) != 0
  tgt = np.where(valid, targets, 0)  # padding targets may be garbage
  ce = -np.take_along_axis(np_log_softmax(z_s), tgt[..., None], -1)[..., 0]
  ce = np.where(valid, ce, 0.0)
  if z_t is None:
    return ce, np.zeros_like(ce)
  log_p = np_log_softmax(np.asarray(z_t, np.float64) / t)
  log_q = np_log_softmax(z_s / t)
  kl = t * t * (np.exp(log_p) * (log_p - log_q)).sum(-1)
  return ce, np.where(valid, kl, 0.0)


def random_case(seed, b=3, s=11, v=37, scale=3.0):
  rng = np.random.default_rng(seed)
  z_s = (scale * rng.standard_normal((b, s, v))).astype(np.float32)
  z_t = (scale * rng.standard_normal((b, s, v))).astype(np.float32)
  targets = rng.integers(0, v, (b, s)).astype(np.int32)
  mask = rng.random((b, s)) > 0.3
  mask[:, -2:] = False  # a padded tail
  targets[~mask] = -1  # out-of-range ids at padding must not matter
  return z_s, z_t, targets, mask


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_from_logits_matches_float64_reference(temperature, gamma):
  z_s, z_t, targets, mask = random_case(int(temperature * 10) + int(gamma * 100))
  ce, kl = losses.kd_token_losses_from_logits(
    jnp.asarray(z_s), jnp.asarray(z_t), targets, mask, temperature=temperature
  )
  assert ce.dtype == jnp.float32 and kl.dtype == jnp.float32
  assert ce.shape == kl.shape == mask.shape
  ce_ref, kl_ref = np_token_losses(z_s, z_t, targets, mask, temperature)
  np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(kl, kl_ref, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(ce)[~mask] == 0) and np.all(np.asarray(kl)[~mask] == 0)
  assert np.all(np.asarray(kl)[mask] >= -1e-6)  # a KL is non-negative
  # The contract's loss: token average over non-padding targets.
  count = mask.sum()
  loss = (jnp.sum(ce) + gamma * jnp.sum(kl)) / count
  loss_ref = (ce_ref.sum() + gamma * kl_ref.sum()) / count
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)


def test_kl_is_zero_when_student_equals_teacher_and_scales_with_t_squared():
  z_s, _, targets, mask = random_case(1)
  _, kl = losses.kd_token_losses_from_logits(z_s, z_s, targets, mask, temperature=2.0)
  np.testing.assert_allclose(kl, 0.0, atol=1e-5)
  # The KD term is T^2 times the plain KL between the temperature-softened distributions,
  # written out here for one token at a time with scipy-free float64 numpy.
  z_t = z_s + np.random.default_rng(2).standard_normal(z_s.shape).astype(np.float32)
  for t in (1.0, 3.0):
    _, kl = losses.kd_token_losses_from_logits(z_s, z_t, targets, mask, temperature=t)
    kl = np.asarray(kl)
    for b, s in [(0, 0), (1, 3), (2, 5)]:
      if not mask[b, s]:
        assert kl[b, s] == 0.0
        continue
      p = np.exp(z_t[b, s].astype(np.float64) / t)
      p /= p.sum()
      q = np.exp(z_s[b, s].astype(np.float64) / t)
      q /= q.sum()
      plain_kl = float(np.sum(p * np.log(p / q)))
      np.testing.assert_allclose(kl[b, s], t * t * plain_kl, rtol=1e-4)


def test_per_domain_sums_keep_a_non_finite_row_in_its_own_domain():
  values = np.ones((4, 3), np.float32)
  values[1, 0] = np.inf  # one row of domain 1 blew up
  mask = np.ones((4, 3), bool)
  mask[3, 2] = False
  domain_id = np.array([0, 1, 2, 2], np.int32)
  sums, counts = jax.jit(losses.per_domain_sums, static_argnums=3)(values, mask, domain_id, 3)
  sums = np.asarray(sums)
  assert sums[0] == 3.0 and sums[2] == 5.0  # finite domains untouched
  assert not np.isfinite(sums[1])  # the error names domain 1, and only domain 1
  np.testing.assert_array_equal(counts, [3.0, 3.0, 5.0])


def test_hidden_head_form_and_teacher_none():
  rng = np.random.default_rng(3)
  b, s, h, ht, v = 2, 7, 8, 12, 29
  hs = rng.standard_normal((b, s, h)).astype(np.float32)
  ws = rng.standard_normal((h, v)).astype(np.float32)
  hte = rng.standard_normal((b, s, ht)).astype(np.float32)
  wt = rng.standard_normal((ht, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, s)).astype(np.int32)
  mask = np.ones((b, s), bool)
  mask[1, 4:] = False
  ce, kl = losses.kd_token_losses(hs, ws, hte, wt, targets, mask, temperature=2.0)
  ce_ref, kl_ref = np_token_losses(
    hs.astype(np.float64) @ ws, hte.astype(np.float64) @ wt, targets, mask, 2.0
  )
  np.testing.assert_allclose(ce, ce_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(kl, kl_ref, rtol=1e-4, atol=1e-4)

  ce0, kl0 = losses.kd_token_losses(hs, ws, None, None, targets, mask, temperature=2.0)
  np.testing.assert_array_equal(ce0, ce)
  np.testing.assert_array_equal(kl0, 0.0)
  with pytest.raises(ValueError):
    losses.kd_token_losses(hs, ws, hte, None, targets, mask, temperature=2.0)

  # bf16 inputs: logits still accumulate in fp32, outputs are fp32.
  ce16, kl16 = jax.jit(lambda *a: losses.kd_token_losses(*a, temperature=2.0))(
    jnp.asarray(hs, jnp.bfloat16), jnp.asarray(ws, jnp.bfloat16),
    jnp.asarray(hte, jnp.bfloat16), jnp.asarray(wt, jnp.bfloat16), targets, mask,
  )
  assert ce16.dtype == kl16.dtype == jnp.float32
  np.testing.assert_allclose(ce16, ce_ref, rtol=0.05, atol=0.1)


def test_gradients_match_finite_differences_and_teacher_gets_none():
  rng = np.random.default_rng(4)
  b, s, h, v, t, gamma = 2, 3, 4, 6, 2.0, 0.7
  args = [
    rng.standard_normal((b, s, h)),
    rng.standard_normal((h, v)),
    rng.standard_normal((b, s, 5)),
    rng.standard_normal((5, v)),
  ]
  targets = rng.integers(0, v, (b, s)).astype(np.int32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], bool)

  @jax.jit
  def loss(hs, ws, hte, wt):
    ce, kl = losses.kd_token_losses(hs, ws, hte, wt, targets, mask, temperature=t)
    return (jnp.sum(ce) + gamma * jnp.sum(kl)) / mask.sum()

  with jax.enable_x64(True):
    x = [jnp.asarray(a, jnp.float64) for a in args]
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*x)
    assert grads[0].dtype == jnp.float64
    eps = 1e-6
    for i in (0, 1):  # student hidden and head: central differences, every entry
      flat = np.asarray(x[i]).ravel()
      fd = np.empty_like(flat)
      for j in range(flat.size):
        up, down = flat.copy(), flat.copy()
        up[j] += eps
        down[j] -= eps
        xu, xd = list(x), list(x)
        xu[i] = jnp.asarray(up.reshape(x[i].shape))
        xd[i] = jnp.asarray(down.reshape(x[i].shape))
        fd[j] = (loss(*xu) - loss(*xd)) / (2 * eps)
      np.testing.assert_allclose(np.asarray(grads[i]).ravel(), fd, rtol=1e-6, atol=1e-8)
    # Frozen teacher: stop_gradient, so exactly zero.
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)
    # Padding tokens get no gradient at all.
    assert np.all(np.asarray(grads[0])[~mask] == 0)


def test_per_domain_sums_matches_numpy():
  rng = np.random.default_rng(5)
  b, s, n = 9, 6, 4
  values = rng.standard_normal((b, s)).astype(np.float32)
  mask = rng.random((b, s)) > 0.25
  domain = np.array([0, 2, 2, 1, 0, 2, 7, 0, 2], np.int32)  # domain 3 empty, 7 out of range
  values[~mask] = np.nan  # masked values must be ignored, even non-finite ones
  sums, counts = jax.jit(losses.per_domain_sums, static_argnums=3)(values, mask, domain, n)
  assert sums.shape == counts.shape == (n,) and sums.dtype == counts.dtype == jnp.float32
  sums_ref = np.zeros(n)
  counts_ref = np.zeros(n)
  for r in range(b):
    if domain[r] < n:
      sums_ref[domain[r]] += values[r][mask[r]].astype(np.float64).sum()
      counts_ref[domain[r]] += mask[r].sum()
  np.testing.assert_allclose(sums, sums_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(counts, counts_ref)
  assert counts[3] == 0 and sums[3] == 0
