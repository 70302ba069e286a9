"""Every KD divergence, naive and chunked, against a float64 numpy reference.

The reference computes each divergence from its definition (docs/loss.md) and its
gradient w.r.t. the student logits by central finite differences in float64, one token
at a time (the adaptive-KL weights held fixed, as the loss treats them as constants), so
it shares no formula with the hand-written chunked gradients. Also: embedding padding
past the tokenizer's vocabulary (padded teacher and student, different pad sizes),
traced temperature/gamma, the config keys and their validation, and the chunked form's
memory.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddk_jax import chunked_loss, losses
from ddk_jax.config_defaults import base_config
from ddk_jax.config_validation import ConfigError, validate_config
from ddk_jax.settings import Settings

DIVS = losses.DIVERGENCES
PARAMS = {"jsd_beta": 0.3, "skew_alpha": 0.2, "akl_mu": 0.5}
B, S, H, HT, V = 2, 9, 8, 12, 23  # 18 positions, 3 of them padding; chunk 8: a ragged last chunk


def divergence(name):
  return losses.Divergence(name, **PARAMS)


# ---- float64 numpy reference ------------------------------------------------------------


def np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def np_kl(a, b):
  return float(np.sum(a * np.log(a / b)))


def np_akl_weights(p, q, mu):
  order = np.argsort(-p, kind="stable")
  gaps = np.abs(p - q)[order]
  head = np.cumsum(p[order]) <= mu
  head[0] = True
  g_head, g_tail = gaps[head].sum(), gaps[~head].sum()
  total = g_head + g_tail
  return (g_head / total, g_tail / total) if total > 0 else (0.0, 0.0)  # P == Q: both KLs are 0 anyway


def np_divergence(name, p, q, weights=None):
  """D(P || Q) of one token from the definitions (P teacher, Q student)."""
  beta, a, mu = PARAMS["jsd_beta"], PARAMS["skew_alpha"], PARAMS["akl_mu"]
  if name == "forward_kl":
    return np_kl(p, q)
  if name == "reverse_kl":
    return np_kl(q, p)
  if name == "jsd":
    m = beta * p + (1 - beta) * q
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
  if name == "tvd":
    return 0.5 * float(np.abs(p - q).sum())
  if name == "skew_forward_kl":
    return np_kl(p, a * p + (1 - a) * q)
  if name == "skew_reverse_kl":
    return np_kl(q, a * q + (1 - a) * p)
  assert name == "akl"
  w_head, w_tail = weights if weights is not None else np_akl_weights(p, q, mu)
  return w_head * np_kl(p, q) + w_tail * np_kl(q, p)


def np_reference(name, z_s, z_t, targets, mask, t, g_ce, g_kd, eps=1e-5):
  """(ce [B,S], kd [B,S], d(sum g_ce*ce + g_kd*kd)/d z_s [B,S,V]) in float64."""
  z_s, z_t = np.asarray(z_s, np.float64), np.asarray(z_t, np.float64)
  ce, kd, dz = np.zeros(mask.shape), np.zeros(mask.shape), np.zeros(z_s.shape)
  for b, s in zip(*np.nonzero(mask)):
    p = np_softmax(z_t[b, s] / t)
    weights = np_akl_weights(p, np_softmax(z_s[b, s] / t), PARAMS["akl_mu"]) if name == "akl" else None

    def f(z, p=p, weights=weights, b=b, s=s):
      ce_ = -np.log(np_softmax(z)[targets[b, s]])
      kd_ = t * t * np_divergence(name, p, np_softmax(z / t), weights)
      return ce_, kd_

    ce[b, s], kd[b, s] = f(z_s[b, s])
    for v in range(z_s.shape[-1]):
      up, down = z_s[b, s].copy(), z_s[b, s].copy()
      up[v] += eps
      down[v] -= eps
      (cu, ku), (cd, kdn) = f(up), f(down)
      dz[b, s, v] = (g_ce[b, s] * (cu - cd) + g_kd[b, s] * (ku - kdn)) / (2 * eps)
  return ce, kd, dz


def make_case(seed, b=B, s=S, h=H, ht=HT, v=V):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape)
  mask = np.ones((b, s), bool)
  mask[0, -3:] = False  # a padded tail
  targets = np.where(mask, rng.integers(0, v, (b, s)), -1).astype(np.int32)  # garbage at padding
  return dict(hs=normal(b, s, h).astype(np.float32), ws=(normal(h, v) * 2 / np.sqrt(h)).astype(np.float32),
              ht=normal(b, s, ht).astype(np.float32), wt=(normal(ht, v) * 2 / np.sqrt(ht)).astype(np.float32),
              targets=targets, mask=mask, g_ce=normal(b, s).astype(np.float32),
              g_kd=normal(b, s).astype(np.float32))


@functools.lru_cache(maxsize=None)
def reference(name, seed, t):
  c = make_case(seed)
  hs, ws = c["hs"].astype(np.float64), c["ws"].astype(np.float64)
  z_s, z_t = hs @ ws, c["ht"].astype(np.float64) @ c["wt"]
  ce, kd, dz = np_reference(name, z_s, z_t, c["targets"], c["mask"], t, c["g_ce"], c["g_kd"])
  return ce, kd, np.einsum("bsv,hv->bsh", dz, ws), np.einsum("bsh,bsv->hv", hs, dz)


def assert_close(actual, desired, tol=1e-5):
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * max(1.0, np.abs(desired).max()))


def test_reference_agrees_with_the_closed_forms():
  """The reference's building blocks: known identities of the divergences."""
  rng = np.random.default_rng(0)
  p, q = np_softmax(rng.standard_normal(9)), np_softmax(rng.standard_normal(9))
  assert np_divergence("jsd", p, q) < np_kl(p, q)
  assert 0 <= np_divergence("tvd", p, q) <= 1
  for name in DIVS:
    assert abs(np_divergence(name, p, p)) < 1e-12
  w_head, w_tail = np_akl_weights(p, q, 0.5)
  assert abs(w_head + w_tail - 1) < 1e-12
  # a = 0: skew KLs are the plain ones.
  np.testing.assert_allclose(np_kl(p, 0 * p + q), np_kl(p, q))


# ---- values and gradients: naive and both chunked forms --------------------------------


def _token_fn(impl, name, t, c):
  div = divergence(name)

  def f(hs, ws, ht, wt):
    if impl == "naive":
      ce, kd = losses.kd_token_losses(hs, ws, ht, wt, c["targets"], c["mask"], temperature=t, divergence=div)
    else:
      ce, kd = chunked_loss.chunked_kd_token_losses(hs, ws, ht, wt, c["targets"], c["mask"], temperature=t,
                                                    divergence=div, chunk_size=8)
    return jnp.sum(c["g_ce"] * ce) + jnp.sum(c["g_kd"] * kd), (ce, kd)
  return f


@pytest.mark.parametrize("t", [0.7, 1.0, 2.5])
@pytest.mark.parametrize("name", DIVS)
def test_token_losses_and_gradients_match_float64_reference(name, t):
  c = make_case(seed=DIVS.index(name))
  ce_ref, kd_ref, dh_ref, dw_ref = reference(name, DIVS.index(name), t)
  args = (c["hs"], c["ws"], c["ht"], c["wt"])
  for impl in ("naive", "chunked"):
    (_, (ce, kd)), g = jax.jit(jax.value_and_grad(_token_fn(impl, name, t, c), argnums=(0, 1, 2, 3),
                                                  has_aux=True))(*args)
    assert ce.dtype == kd.dtype == jnp.float32
    assert_close(ce, ce_ref)
    assert_close(kd, kd_ref)
    assert np.all(np.asarray(kd)[~c["mask"]] == 0)
    assert_close(g[0], dh_ref)
    assert_close(g[1], dw_ref)
    assert np.all(np.asarray(g[0])[~c["mask"]] == 0)  # padding tokens pass no gradient
    np.testing.assert_array_equal(g[2], 0.0)  # frozen teacher
    np.testing.assert_array_equal(g[3], 0.0)


@pytest.mark.parametrize("name", DIVS)
def test_loss_sum_matches_float64_reference(name):
  """The fused training form: sum(ce) + gamma * sum(kd) and its gradient (unit g_ce, g_kd = gamma)."""
  t, gamma = 2.0, 0.6
  c = make_case(seed=10 + DIVS.index(name))
  hs, ws = c["hs"].astype(np.float64), c["ws"].astype(np.float64)
  ones = np.ones(c["mask"].shape)
  ce_ref, kd_ref, dz = np_reference(name, hs @ ws, c["ht"].astype(np.float64) @ c["wt"], c["targets"], c["mask"],
                                    t, ones, gamma * ones)

  def f(hs, ws, ht, wt):
    return chunked_loss.chunked_kd_loss_sum(hs, ws, ht, wt, c["targets"], c["mask"], temperature=t, gamma=gamma,
                                            divergence=divergence(name), chunk_size=8)

  (total, (ce, kd)), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
    c["hs"], c["ws"], c["ht"], c["wt"])
  assert_close(total, ce_ref.sum() + gamma * kd_ref.sum())
  assert_close(ce, ce_ref)
  assert_close(kd, kd_ref)
  assert_close(g[0], np.einsum("bsv,hv->bsh", dz, ws))
  assert_close(g[1], np.einsum("bsh,bsv->hv", hs, dz))
  # Without differentiation (eval), the same values.
  total2, (_, kd2) = jax.jit(f)(c["hs"], c["ws"], c["ht"], c["wt"])
  assert_close(total2, total, 1e-6)
  assert_close(kd2, kd, 1e-6)


def test_limits_and_special_values():
  c = make_case(seed=3)
  z_s = jnp.asarray(c["hs"] @ c["ws"])
  z_t = jnp.asarray(c["ht"] @ c["wt"])
  kd = lambda div, zt=z_t, t=1.5: losses.kd_token_losses_from_logits(z_s, zt, c["targets"], c["mask"],
                                                                     temperature=t, divergence=div)[1]
  for name in DIVS:  # D(P || P) = 0
    np.testing.assert_allclose(kd(divergence(name), zt=z_s), 0.0, atol=1e-5)
  # Skew a = 0: the plain KLs. JSD: ~ beta KL(P||Q) as beta -> 0, ~ (1 - beta) KL(Q||P) as beta -> 1.
  np.testing.assert_allclose(kd(losses.Divergence("skew_forward_kl", skew_alpha=0.0)), kd("forward_kl"), rtol=1e-6)
  np.testing.assert_allclose(kd(losses.Divergence("skew_reverse_kl", skew_alpha=0.0)), kd("reverse_kl"), rtol=1e-6)
  small = 1e-3
  np.testing.assert_allclose(kd(losses.Divergence("jsd", jsd_beta=small)) / small, kd("forward_kl"), rtol=2e-2,
                             atol=1e-3)
  np.testing.assert_allclose(kd(losses.Divergence("jsd", jsd_beta=1 - small)) / small, kd("reverse_kl"), rtol=2e-2,
                             atol=1e-3)
  tvd = np.asarray(kd("tvd")) / 1.5**2
  assert np.all(tvd >= 0) and np.all(tvd <= 1)


def test_traced_temperature_and_gamma_equal_static_values():
  """Schedules pass T and gamma as traced scalars: same numbers, one compilation for all values."""
  c = make_case(seed=5)
  args = (c["hs"], c["ws"], c["ht"], c["wt"])
  for name in ("forward_kl", "jsd", "akl"):
    def f(hs, ws, ht, wt, t, gamma, name=name):
      return chunked_loss.chunked_kd_loss_sum(hs, ws, ht, wt, c["targets"], c["mask"], temperature=t, gamma=gamma,
                                              divergence=divergence(name), chunk_size=8)[0]

    traced = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 4, 5)))
    for t, gamma in ((1.0, 0.5), (2.0, 1.5)):
      static = jax.jit(jax.value_and_grad(functools.partial(f, t=t, gamma=gamma), argnums=(0, 1)))(*args)
      dynamic = traced(*args, jnp.float32(t), jnp.float32(gamma))
      assert_close(dynamic[0], static[0], 1e-6)
      assert_close(dynamic[1][0], static[1][0], 1e-6)
      assert_close(dynamic[1][1], static[1][1], 1e-6)
      assert dynamic[1][2] == 0 and dynamic[1][3] == 0  # no gradient into the hyper-parameters
    assert traced._cache_size() == 1
    naive = jax.jit(lambda t, name=name: losses.kd_token_losses(*args, c["targets"], c["mask"], temperature=t,
                                                                divergence=divergence(name))[1])
    assert_close(naive(jnp.float32(2.0)), losses.kd_token_losses(*args, c["targets"], c["mask"], temperature=2.0,
                                                                  divergence=divergence(name))[1], 1e-6)


# ---- vocabulary padding --------------------------------------------------------------------


def _pad_cols(w, n, rng):
  return np.concatenate([w, 3 * rng.standard_normal((w.shape[0], n)).astype(np.float32)], axis=1)


@pytest.mark.parametrize("name", DIVS)
def test_padded_vocabularies_give_the_unpadded_losses_and_gradients(name):
  """Student padded by 5 rows, teacher by 9 (or by 2, fewer than the student), valid_vocab = V:
  the same values and gradients as the unpadded models, zero gradient on the padded rows."""
  rng = np.random.default_rng(40 + DIVS.index(name))
  c = make_case(seed=20 + DIVS.index(name))
  div, t, gamma = divergence(name), 1.7, 0.8
  ws_pad = _pad_cols(c["ws"], 5, rng)
  base = (c["hs"], c["ws"], c["ht"], c["wt"])

  def naive(hs, ws, ht, wt, valid=None):
    ce, kd = losses.kd_token_losses(hs, ws, ht, wt, c["targets"], c["mask"], temperature=t, divergence=div,
                                    valid_vocab=valid)
    return jnp.sum(c["g_ce"] * ce) + jnp.sum(c["g_kd"] * kd), (ce, kd)

  def tokens(hs, ws, ht, wt, valid=None):
    ce, kd = chunked_loss.chunked_kd_token_losses(hs, ws, ht, wt, c["targets"], c["mask"], temperature=t,
                                                  divergence=div, chunk_size=8, valid_vocab=valid)
    return jnp.sum(c["g_ce"] * ce) + jnp.sum(c["g_kd"] * kd), (ce, kd)

  def fused(hs, ws, ht, wt, valid=None):
    return chunked_loss.chunked_kd_loss_sum(hs, ws, ht, wt, c["targets"], c["mask"], temperature=t, gamma=gamma,
                                            divergence=div, chunk_size=8, valid_vocab=valid)

  for teacher_pad in (9, 2):
    wt_pad = _pad_cols(c["wt"], teacher_pad, rng)
    for fn in (naive, tokens, fused):
      vg = lambda *a, fn=fn, **k: jax.jit(jax.value_and_grad(functools.partial(fn, **k), argnums=(0, 1),
                                                             has_aux=True))(*a)
      (l0, (ce0, kd0)), g0 = vg(*base)
      (l1, (ce1, kd1)), g1 = vg(c["hs"], ws_pad, c["ht"], wt_pad, valid=V)
      assert_close(l1, l0, 1e-6)
      assert_close(ce1, ce0, 1e-6)
      assert_close(kd1, kd0, 1e-6)
      assert_close(g1[0], g0[0], 1e-6)
      assert g1[1].shape == ws_pad.shape
      assert_close(g1[1][:, :V], g0[1], 1e-6)
      np.testing.assert_array_equal(g1[1][:, V:], 0.0)  # padded rows: no mass, no gradient


def test_padding_without_valid_vocab_would_change_the_loss_and_errors():
  c = make_case(seed=2)
  rng = np.random.default_rng(2)
  ws_pad = _pad_cols(c["ws"], 4, rng)
  kw = dict(temperature=1.0, gamma=1.0, chunk_size=8)
  full = chunked_loss.chunked_kd_loss_sum(c["hs"], ws_pad, c["ht"], _pad_cols(c["wt"], 4, rng), c["targets"],
                                          c["mask"], **kw)[0]
  real = chunked_loss.chunked_kd_loss_sum(c["hs"], c["ws"], c["ht"], c["wt"], c["targets"], c["mask"], **kw)[0]
  assert abs(float(full) - float(real)) > 1e-3  # the padded rows took probability mass
  with pytest.raises(ValueError, match="vocab"):  # the teacher must cover the valid vocabulary
    chunked_loss.chunked_kd_loss_sum(c["hs"], ws_pad, c["ht"], c["wt"][:, :-1], c["targets"], c["mask"],
                                     valid_vocab=V, **kw)
  with pytest.raises(ValueError, match="valid_vocab"):
    losses.kd_token_losses(c["hs"], c["ws"], None, None, c["targets"], c["mask"], temperature=1.0,
                           valid_vocab=V + 1)
  with pytest.raises(ValueError, match="divergence"):
    losses.Divergence("js")
  with pytest.raises(ValueError, match="jsd_beta"):
    losses.Divergence("jsd", jsd_beta=1.0)


def test_a_teacher_shipping_another_tokenizer_fails_at_start(tmp_path):
  import data_helpers

  from ddk_jax import bootstrap
  from ddk_jax.data import tokenizer as tok_lib
  from ddk_jax.errors import TrainingError

  student = data_helpers.make_tokenizer(str(tmp_path / "student"))
  same = data_helpers.make_tokenizer(str(tmp_path / "same"))
  other = str(tmp_path / "other")
  tok_lib.train_bpe_tokenizer(data_helpers.make_texts(200, "zzz", seed=5), other, vocab_size=400)
  cfg = base_config()
  cfg.teacher.source, cfg.student.source = "hf", "hf"
  cfg.student.path = cfg.data.tokenizer = student
  cfg.teacher.path = same
  bootstrap.check_teacher_tokenizer(cfg)  # the same tokenizer in another directory: fine
  cfg.teacher.path = other
  with pytest.raises(TrainingError, match=r"teacher tokenizer \(.*other\) and student tokenizer \(.*student\) "
                                          r"differ: \d+ ids map to different tokens"):
    bootstrap.check_teacher_tokenizer(cfg)
  cfg.teacher.path = str(tmp_path / "no_tokenizer")  # a teacher without a tokenizer.json: nothing to compare
  bootstrap.check_teacher_tokenizer(cfg)


# ---- memory: no [tokens, V] buffer for any divergence --------------------------------------


@pytest.mark.parametrize("name", DIVS)
def test_chunked_divergences_never_hold_a_tokens_by_vocab_buffer(name):
  """Compile only: the training form's temporaries stay a few [chunk, V] blocks (vocab padding masked too);
  the adaptive KL's sort of each chunk's teacher probabilities takes a few more."""
  b, s, h, v, chunk = 4, 2048, 32, 8192, 256
  sd = jax.ShapeDtypeStruct
  shapes = (sd((b, s, h), jnp.float32), sd((h, v), jnp.float32), sd((b, s, h), jnp.float32),
            sd((h, v), jnp.float32), sd((b, s), jnp.int32), sd((b, s), jnp.bool_))

  def loss(hs, ws, ht, wt, tgt, m):
    return chunked_loss.chunked_kd_loss_sum(hs, ws, ht, wt, tgt, m, temperature=2.0, gamma=0.5, chunk_size=chunk,
                                            divergence=name, valid_vocab=v - 64)[0]

  temp = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
  full = b * s * v * 4  # one fp32 [tokens, V] buffer: 256 MiB
  block = chunk * v * 4  # one fp32 [chunk, V] block: 8 MiB
  blocks = 11 if name == "akl" else 9
  assert temp < blocks * block + 2 * h * v * 4 < full * 3 / 4, (name, temp / block)


# ---- config -------------------------------------------------------------------------------


def _config(**loss):
  cfg = base_config()
  for key, value in loss.items():
    cfg.loss[key] = value
  return cfg


@pytest.mark.parametrize("overrides, message", [
  ({"divergence": "js"}, "loss.divergence='js': must be one of forward_kl, reverse_kl, jsd, tvd, skew_forward_kl, "
                         "skew_reverse_kl, akl"),
  ({"jsd_beta": 0.0}, "loss.jsd_beta=0.0: must be in (0, 1)"),
  ({"jsd_beta": 1.0}, "loss.jsd_beta"),
  ({"skew_alpha": 1.0}, "loss.skew_alpha=1.0: must be in [0, 1)"),
  ({"skew_alpha": -0.1}, "loss.skew_alpha"),
  ({"akl_mu": 1.5}, "loss.akl_mu=1.5: must be in [0, 1]"),
  ({"gamma_schedule": "step"}, "loss.gamma_schedule='step': must be one of constant, linear, cosine"),
  ({"temperature_schedule": "cosine"}, "loss.temperature_schedule='cosine' needs loss.temperature_end"),
  ({"temperature_schedule": "linear", "temperature_end": 0.0}, "loss.temperature_end=0.0: must be > 0"),
  ({"gamma_schedule": "linear", "gamma_end": -1.0}, "loss.gamma_end=-1.0: must be >= 0"),
])
def test_loss_config_errors_name_the_key(overrides, message):
  with pytest.raises(ConfigError) as e:
    validate_config(_config(**overrides), 1)
  assert message in str(e.value)


def test_settings_carry_the_loss_keys_and_defaults_are_todays_loss():
  s = Settings.from_config(base_config(), 1).loss
  assert (s.divergence, s.gamma_schedule, s.temperature_schedule, s.gamma_end, s.temperature_end) == (
    "forward_kl", "constant", "constant", None, None)
  s = Settings.from_config(_config(divergence="akl", akl_mu=0.3, gamma_schedule="cosine", gamma_end=0.25,
                                   temperature_schedule="linear", temperature_end=1), 1).loss
  assert (s.divergence, s.akl_mu, s.gamma_schedule, s.gamma_end, s.temperature_schedule, s.temperature_end) == (
    "akl", 0.3, "cosine", 0.25, "linear", 1.0)
  assert isinstance(s.temperature_end, float)
