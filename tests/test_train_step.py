"""Train/eval step: gradients, sharded vs single-device equality, frozen teacher, accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from ddk_jax import model as model_lib, sharding, train_step as ts
from ddk_jax.model import ModelConfig

STUDENT = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
TEACHER = ModelConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=4,
                      param_dtype="bfloat16", compute_dtype="bfloat16")
NUM_DOMAINS = 3


def make_batch(b=8, s=16, seed=0, vocab=128):
  """Packed rows: two documents per row, a padded tail, domain ids 0..2."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (b, s)).astype(np.int32)
  targets = rng.integers(0, vocab, (b, s)).astype(np.int32)
  seg = np.zeros((b, s), np.int32)
  pos = np.zeros((b, s), np.int32)
  for r in range(b):
    cut, end = rng.integers(3, s - 4), s - rng.integers(0, 3)
    seg[r, :cut], seg[r, cut:end] = 1, 2
    pos[r, :cut], pos[r, cut:end] = np.arange(cut), np.arange(end - cut)
  return {"inputs": inputs, "targets": targets, "segment_ids": seg, "positions": pos,
          "domain_id": (np.arange(b) % NUM_DOMAINS).astype(np.int32)}


def opt():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


def run_steps(mesh, n_steps=2, mode="kd", loss_impl="naive", accum=1, batch_seed=0, optimizer=None):
  rules = sharding.DEFAULT_RULES
  optimizer = optimizer or opt()
  opts = ts.StepOptions(num_domains=NUM_DOMAINS, mode=mode, gamma=0.7, temperature=2.0, grad_accum=accum,
                        loss_impl=loss_impl)
  s_sh = ts.params_shardings(STUDENT, mesh, rules)
  t_sh = ts.params_shardings(TEACHER, mesh, rules)
  params = ts.init_params_sharded(STUDENT, jax.random.key(0), s_sh)
  teacher = ts.init_params_sharded(TEACHER, jax.random.key(1), t_sh) if mode != "cpt" else None
  state_sh = ts.state_shardings(s_sh, optimizer, params, mesh)
  state = jax.jit(lambda p: ts.init_train_state(p, optimizer), out_shardings=state_sh)(params)
  step = ts.jit_train_step(ts.make_train_step(STUDENT, TEACHER, optimizer, opts), state_sh,
                           t_sh if teacher is not None else None, mesh, rules)
  metrics = []
  for i in range(n_steps):
    batch = sharding.host_batch_to_global(make_batch(seed=batch_seed + i), mesh, rules)
    state, m = step(state, teacher, batch)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics, teacher


def mesh_of(devices, shape):
  return Mesh(np.asarray(devices).reshape(shape), sharding.MESH_AXES)


@pytest.mark.devices(8)
def test_one_device_and_8_device_mesh_agree():
  assert jax.device_count() >= 8, "conftest sets 8 emulated CPU devices"
  # Plain SGD: Adam's first step is ~lr*sign(g) and would amplify rounding noise in tiny grads.
  single, m1, _ = run_steps(mesh_of(jax.devices()[:1], (1, 1, 1)), optimizer=optax.sgd(0.5))
  multi, m8, _ = run_steps(mesh_of(jax.devices()[:8], (2, 2, 2)), optimizer=optax.sgd(0.5))
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
    np.testing.assert_allclose(a["domain_count"], b["domain_count"])
  for a, b in zip(jax.tree.leaves(single["params"]), jax.tree.leaves(multi["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_teacher_frozen_and_has_no_optimizer_state():
  mesh = mesh_of(jax.devices()[:1], (1, 1, 1))
  state, metrics, teacher = run_steps(mesh, n_steps=1)
  teacher_before = jax.device_get(ts.init_params_sharded(TEACHER, jax.random.key(1),
                                                         ts.params_shardings(TEACHER, mesh, sharding.DEFAULT_RULES)))
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(jax.device_get(teacher))):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  # Optimizer moments cover exactly the student's params (mu + nu), nothing of the teacher.
  student_size = sum(x.size for x in jax.tree.leaves(state["params"]))
  opt_size = sum(np.size(x) for x in jax.tree.leaves(state["opt_state"]))
  assert student_size * 2 <= opt_size < student_size * 2 + 16
  assert metrics[0]["kl"] > 0 and metrics[0]["ce"] > 0


def test_loss_parts_and_per_domain_sums():
  mesh = mesh_of(jax.devices()[:1], (1, 1, 1))
  _, metrics, _ = run_steps(mesh, n_steps=1)
  m = metrics[0]
  batch = make_batch()
  counts = np.bincount(batch["domain_id"], weights=(batch["segment_ids"] != 0).sum(1), minlength=NUM_DOMAINS)
  np.testing.assert_allclose(m["domain_count"], counts)
  np.testing.assert_allclose(m["loss"], m["ce"] + 0.7 * m["kl"], rtol=1e-5)
  np.testing.assert_allclose(m["domain_ce_sum"].sum() / counts.sum(), m["ce"], rtol=1e-5)


def test_cpt_mode_has_no_teacher():
  state, metrics, teacher = run_steps(mesh_of(jax.devices()[:1], (1, 1, 1)), n_steps=1, mode="cpt")
  assert teacher is None and metrics[0]["kl"] == 0.0
  np.testing.assert_allclose(metrics[0]["loss"], metrics[0]["ce"], rtol=1e-6)


def test_gradient_accumulation_equals_full_batch():
  mesh = mesh_of(jax.devices()[:1], (1, 1, 1))
  full, m_full, _ = run_steps(mesh, n_steps=1, optimizer=optax.sgd(0.5))
  acc, m_acc, _ = run_steps(mesh, n_steps=1, accum=4, optimizer=optax.sgd(0.5))
  np.testing.assert_allclose(m_full[0]["loss"], m_acc[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_full[0]["grad_norm"], m_acc[0]["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(acc["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_and_naive_loss_steps_agree():
  mesh = mesh_of(jax.devices()[:1], (1, 1, 1))
  naive, m_naive, _ = run_steps(mesh, n_steps=1, loss_impl="naive", optimizer=optax.sgd(0.5))
  chunked, m_chunked, _ = run_steps(mesh, n_steps=1, loss_impl="chunked", optimizer=optax.sgd(0.5))
  np.testing.assert_allclose(m_naive[0]["loss"], m_chunked[0]["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(naive["params"]), jax.tree.leaves(chunked["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gradients_match_finite_differences():
  """The step's loss gradient (f64) against central differences along random directions."""
  with jax.enable_x64(True):
    student = dataclasses.replace(STUDENT, param_dtype="float64", compute_dtype="float64", num_layers=1)
    teacher = dataclasses.replace(TEACHER, param_dtype="float64", compute_dtype="float64", num_layers=1)
    params = model_lib.init_params(student, jax.random.key(0))
    t_params = model_lib.init_params(teacher, jax.random.key(1))
    batch = {k: jnp.asarray(v) for k, v in make_batch(b=2, s=8).items()}
    opts = ts.StepOptions(num_domains=NUM_DOMAINS, mode="kd", gamma=0.5, temperature=1.5, loss_impl="naive")
    captured = {}

    def grab(grads, state, params=None):
      captured["g"] = grads
      return jax.tree.map(jnp.zeros_like, grads), state
    capture = optax.GradientTransformation(lambda p: optax.EmptyState(), grab)
    step = ts.make_train_step(student, teacher, capture, opts)
    state = ts.init_train_state(params, capture)
    _, metrics = step(state, t_params, batch)

    def loss_of(p):
      _, m = step(ts.init_train_state(p, capture), t_params, batch)
      return m["loss"]
    rng = np.random.default_rng(0)
    for _ in range(3):
      direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), params)
      eps = 1e-7  # float64: truncation error ~eps^2 stays far below the tolerance
      plus = loss_of(jax.tree.map(lambda p, d: p + eps * d, params, direction))
      minus = loss_of(jax.tree.map(lambda p, d: p - eps * d, params, direction))
      numeric = (plus - minus) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(captured["g"]), jax.tree.leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-4)


def test_non_finite_step_is_skipped():
  mesh = mesh_of(jax.devices()[:1], (1, 1, 1))
  rules = sharding.DEFAULT_RULES
  optimizer = opt()
  opts = ts.StepOptions(num_domains=NUM_DOMAINS, mode="cpt", loss_impl="naive")
  s_sh = ts.params_shardings(STUDENT, mesh, rules)
  params = ts.init_params_sharded(STUDENT, jax.random.key(0), s_sh)
  params = jax.tree.map(lambda x: x, params)
  params["final_norm"] = params["final_norm"].at[0].set(jnp.nan)
  state_sh = ts.state_shardings(s_sh, optimizer, params, mesh)
  state = jax.jit(lambda p: ts.init_train_state(p, optimizer), out_shardings=state_sh)(params)
  before = jax.device_get(state["params"])
  step = ts.jit_train_step(ts.make_train_step(STUDENT, None, optimizer, opts), state_sh, None, mesh, rules)
  state, m = step(state, None, sharding.host_batch_to_global(make_batch(), mesh, rules))
  assert not bool(m["finite"]) and int(state["skipped_steps"]) == 1 and int(state["step"]) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state["params"]))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.devices(8)
def test_eval_step_per_domain():
  mesh = mesh_of(jax.devices()[:8], (4, 2, 1))
  rules = sharding.DEFAULT_RULES
  s_sh = ts.params_shardings(STUDENT, mesh, rules)
  params = ts.init_params_sharded(STUDENT, jax.random.key(0), s_sh)
  opts = ts.StepOptions(num_domains=NUM_DOMAINS, loss_impl="naive")
  ev = ts.jit_eval_step(ts.make_eval_step(STUDENT, opts), s_sh, mesh, rules)
  batch = make_batch()
  sums, counts = jax.device_get(ev(params, sharding.host_batch_to_global(batch, mesh, rules)))
  logits = np.asarray(model_lib.apply_logits(jax.device_get(params), STUDENT, batch["inputs"], batch["positions"],
                                             batch["segment_ids"]), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
  ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * (batch["segment_ids"] != 0)
  expected = np.bincount(batch["domain_id"], weights=ce.sum(1), minlength=NUM_DOMAINS)
  np.testing.assert_allclose(sums, expected, rtol=1e-4)
  assert counts.sum() == (batch["segment_ids"] != 0).sum()


def test_teacher_with_padded_vocab_is_scored_on_the_shared_vocab():
  """A teacher whose embedding is padded past the tokenizer (Qwen-style 152064 vs 151936)
  is scored on the student's vocabulary: its padded rows get no probability mass."""
  padded = dataclasses.replace(TEACHER, vocab_size=160, param_dtype="float32", compute_dtype="float32")
  mesh = mesh_of(jax.devices()[:1], (1, 1, 1))
  rules = sharding.DEFAULT_RULES
  sh = ts.params_shardings(padded, mesh, rules)
  params = ts.init_params_sharded(padded, jax.random.key(3), sh)
  opts = ts.StepOptions(num_domains=NUM_DOMAINS, mode="cpt", loss_impl="naive")
  batch = make_batch(vocab=128)
  sums, counts = ts.jit_eval_step(ts.make_eval_step(padded, opts, vocab_size=128), sh, mesh, rules)(
      params, sharding.host_batch_to_global(batch, mesh, rules))
  hidden = model_lib.apply_hidden(params, padded, batch["inputs"], batch["positions"], batch["segment_ids"])
  logits = np.asarray(hidden @ model_lib.head_weight(params, padded), np.float64)[..., :128]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * (batch["segment_ids"] != 0)
  want = [ce[batch["domain_id"] == d].sum() for d in range(NUM_DOMAINS)]
  np.testing.assert_allclose(np.asarray(sums), want, rtol=1e-5)
  full, _ = ts.jit_eval_step(ts.make_eval_step(padded, opts), sh, mesh, rules)(
      params, sharding.host_batch_to_global(batch, mesh, rules))
  assert np.all(np.asarray(full) > np.asarray(sums))  # the full vocab would spread mass onto padded rows


# ---- the loss object: divergences, schedules, vocab padding ----------------------------


def test_step_options_shorthands_and_loss_spec_agree():
  legacy = ts.StepOptions(num_domains=3, gamma=0.7, temperature=2.0, loss_impl="naive", loss_chunk_size=64)
  assert legacy.loss == ts.LossSpec(gamma=0.7, temperature=2.0, impl="naive", chunk_size=64)
  spec = ts.LossSpec(divergence="jsd", jsd_beta=0.2, gamma=0.5, temperature=1.5, valid_vocab=100)
  opts = ts.StepOptions(num_domains=3, loss=spec)
  assert (opts.gamma, opts.temperature, opts.loss_impl) == (0.5, 1.5, "chunked")  # mirrors of the spec
  assert dataclasses.replace(opts, mode="cpt").loss == spec
  with pytest.raises(ValueError, match="contradicts"):
    ts.StepOptions(num_domains=3, gamma=0.7, loss=spec)
  with pytest.raises(ValueError, match="divergence"):
    ts.LossSpec(divergence="kl")
  assert spec.hyper(5) == (0.5, 1.5)  # constant schedules: Python floats, compile-time constants


def test_schedule_values():
  for step, lin, cos in ((0, 2.0, 2.0), (25, 1.75, 2.0 - 1.0 * (1 - np.cos(np.pi / 4)) / 2), (50, 1.5, 1.5),
                         (100, 1.0, 1.0), (150, 1.0, 1.0)):
    np.testing.assert_allclose(ts.schedule_value("linear", 2.0, 1.0, jnp.int32(step), 100), lin, rtol=1e-6)
    np.testing.assert_allclose(ts.schedule_value("cosine", 2.0, 1.0, jnp.int32(step), 100), cos, rtol=1e-6)
  assert ts.schedule_value("constant", 2.0, None, jnp.int32(7), 100) == 2.0


def _one_device_step(opts, student=STUDENT, teacher=TEACHER, optimizer=None):
  mesh = mesh_of(jax.devices()[:1], (1, 1, 1))
  rules = sharding.DEFAULT_RULES
  optimizer = optimizer or optax.sgd(0.5)
  s_sh = ts.params_shardings(student, mesh, rules)
  t_sh = ts.params_shardings(teacher, mesh, rules)
  state_sh = ts.state_shardings(s_sh, optimizer, jax.eval_shape(lambda: model_lib.init_params(student,
                                                                                             jax.random.key(0))),
                                mesh)
  step = ts.jit_train_step(ts.make_train_step(student, teacher, optimizer, opts), state_sh, t_sh, mesh, rules)
  # The step donates its state: give it copies of the params.
  return step, lambda params: ts.init_train_state(jax.tree.map(jnp.array, params), optimizer), mesh, rules


def test_scheduled_gamma_and_temperature_run_in_one_compiled_step():
  spec = ts.LossSpec(impl="chunked", divergence="skew_reverse_kl", gamma=1.0, gamma_schedule="linear", gamma_end=0.2,
                     temperature=3.0, temperature_schedule="cosine", temperature_end=1.0, schedule_steps=4)
  opts = ts.StepOptions(num_domains=NUM_DOMAINS, mode="kd", loss=spec)
  step, init, mesh, rules = _one_device_step(opts)
  params = model_lib.init_params(STUDENT, jax.random.key(0))
  teacher = model_lib.init_params(TEACHER, jax.random.key(1))
  state = init(params)
  batch = sharding.host_batch_to_global(make_batch(), mesh, rules)
  seen = []
  for k in range(5):
    state, m = step(state, teacher, batch)
    m = jax.device_get(m)
    frac = min(k / 4, 1.0)
    np.testing.assert_allclose(m["gamma"], 1.0 + (0.2 - 1.0) * frac, rtol=1e-6)
    np.testing.assert_allclose(m["temperature"], 1.0 + 2.0 * 0.5 * (1 + np.cos(np.pi * frac)), rtol=1e-6)
    np.testing.assert_allclose(m["loss"], m["ce"] + m["gamma"] * m["kl"], rtol=1e-5)
    seen.append(m)
    if k == 1:  # (the first call took host arrays, the later ones the step's own outputs)
      compiled = step._cache_size()
  assert step._cache_size() == compiled  # no compilation per value
  # The values in effect are the ones used: step 2 of the schedule equals a constant-valued step at step 2.
  const = ts.StepOptions(num_domains=NUM_DOMAINS, mode="kd", loss=dataclasses.replace(
      spec, gamma=float(seen[2]["gamma"]), gamma_schedule="constant", temperature=float(seen[2]["temperature"]),
      temperature_schedule="constant"))
  const_step, *_ = _one_device_step(const)
  at2 = dict(init(params), step=jnp.int32(2))
  _, m_const = const_step(at2, teacher, batch)
  _, m_sched = step(dict(init(params), step=jnp.int32(2)), teacher, batch)
  np.testing.assert_allclose(m_sched["loss"], m_const["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_sched["kl"], m_const["kl"], rtol=1e-6)
  np.testing.assert_allclose(m_const["gamma"], m_sched["gamma"], rtol=0)


def _padded_params(params, padded_cfg, vocab, seed):
  """`params` with its vocabulary rows extended by random ones up to padded_cfg.vocab_size."""
  extra = model_lib.init_params(padded_cfg, jax.random.key(seed))
  out = dict(params)
  out["embed"] = jnp.concatenate([params["embed"], extra["embed"][vocab:]], axis=0)
  out["lm_head"] = jnp.concatenate([params["lm_head"], 5 * extra["lm_head"][:, vocab:]], axis=1)
  return out


@pytest.mark.parametrize("impl,divergence", [("chunked", "jsd"), ("naive", "akl")])
def test_padded_student_and_teacher_train_like_unpadded_ones(impl, divergence):
  """Student embedding padded to 136 rows, teacher to 160, one 128-id tokenizer (valid_vocab=128): the
  same loss and update as the unpadded pair; padded rows get no gradient; eval scores match too."""
  vocab = 128
  student_pad = dataclasses.replace(STUDENT, vocab_size=136)
  teacher_pad = dataclasses.replace(TEACHER, vocab_size=160)
  params = model_lib.init_params(STUDENT, jax.random.key(0))
  teacher = model_lib.init_params(TEACHER, jax.random.key(1))
  params_pad = _padded_params(params, student_pad, vocab, 2)
  teacher_pad_params = _padded_params(teacher, teacher_pad, vocab, 3)
  spec = ts.LossSpec(impl=impl, divergence=divergence, gamma=0.7, temperature=2.0, valid_vocab=vocab)
  opts = ts.StepOptions(num_domains=NUM_DOMAINS, mode="kd", loss=spec)
  step, init, mesh, rules = _one_device_step(opts)
  step_pad, init_pad, _, _ = _one_device_step(opts, student_pad, teacher_pad)
  batch = sharding.host_batch_to_global(make_batch(vocab=vocab), mesh, rules)
  new, m = jax.device_get(step(init(params), teacher, batch))
  new_pad, m_pad = jax.device_get(step_pad(init_pad(params_pad), teacher_pad_params, batch))
  for key in ("loss", "ce", "kl", "grad_norm"):
    np.testing.assert_allclose(m_pad[key], m[key], rtol=2e-5, err_msg=key)
  p, p_pad = new["params"], new_pad["params"]
  np.testing.assert_allclose(p_pad["lm_head"][:, :vocab], p["lm_head"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(p_pad["lm_head"][:, vocab:], params_pad["lm_head"][:, vocab:])  # zero gradient
  np.testing.assert_array_equal(p_pad["embed"][vocab:], params_pad["embed"][vocab:])
  np.testing.assert_allclose(p_pad["layers"]["wq"], p["layers"]["wq"], rtol=1e-5, atol=1e-6)

  eval_opts = dataclasses.replace(opts, mode="cpt")
  for cfg, prm, cfg_pad, prm_pad in ((STUDENT, params, student_pad, params_pad),
                                     (TEACHER, teacher, teacher_pad, teacher_pad_params)):
    ev = ts.make_eval_step(cfg, eval_opts)
    ev_pad = ts.make_eval_step(cfg_pad, eval_opts)
    sums, counts = jax.device_get(jax.jit(ev)(prm, batch))
    sums_pad, counts_pad = jax.device_get(jax.jit(ev_pad)(prm_pad, batch))
    np.testing.assert_allclose(sums_pad, sums, rtol=1e-5)
    np.testing.assert_array_equal(counts_pad, counts)
