"""The offline teacher (ddk_jax.teacher_cache): a top-k cache of the teacher over the run's rows.

* The KD term from k+1 cached buckets: the chunked training form against the naive (autodiff)
  reference for every divergence a cache supports, and against the online teacher when k = V.
* The tiny run of tiny_run.py (3 domains, 8 emulated devices, 20 steps, DDK every 3 steps): with
  k = the vocabulary (float32 values) the cached run's per-step loss, CE and KL equal the online
  run's within 1e-5, lT comes from the cache and the mixture draws the same rows; SIGKILL + rerun of
  the cached run is bit-identical to the uninterrupted one, past the first epoch of a domain.
* k = 64: the KD term is a lower bound of the full one; at T = 1 the gap is exactly the teacher's
  tail mass times the KL between the tail-normalised distributions (measured on the tiny data).
* Files and checks: a truncated shard fails with its file name and a rerun repairs it byte for
  byte; a cache of another teacher, tokenizer, seq_len, data, process count or too few steps is
  refused naming what differs; the CLI as a subprocess (smoke, rerun, user errors exit 2).
* Two processes (jax.distributed over loopback, one CPU device each): the CLI on both writes each
  process's own slice of every domain and one manifest; a two-process run reading that cache
  (k = the vocabulary, float32) equals the same run with the online teacher within 1e-5 per step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_run
from ddk_jax import chunked_loss, losses, teacher_cache, trainer

STEPS = 20
SEQ = 64
TIMEOUT = 300


def _train_rows(workdir):
  return [r for r in tiny_run.metrics(workdir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """The session's tiny assets, under its persistent compilation cache."""
  root = tiny_run.shared_root(tmp_path_factory)
  cache = os.path.join(root, "jax_cache")
  with tiny_run.compilation_cache(cache):
    yield {"root": root, "assets": tiny_run.shared_assets(root), "jax_cache": cache}


@pytest.fixture(scope="module")
def env(shared, tmp_path_factory):
  """A cache with k = the vocabulary (float32), and the 20-step online and cached runs."""
  from ddk_jax import data
  assets = shared["assets"]
  vocab = data.load_tokenizer_from_config(tiny_run.tiny_config(assets).data).max_id + 1
  tmp = str(tmp_path_factory.mktemp("teacher_cache"))
  # seq_len 64: a domain's epoch is 26 to 39 rows, so the 160 rows of 20 steps run past epoch boundaries.
  exact = {"steps": STEPS, "checkpoint.every": 4, "data.seq_len": SEQ,
           "teacher.cache_dir": os.path.join(tmp, "cache_kv"), "teacher.cache_top_k": vocab,
           "teacher.cache_dtype": "float32", "teacher.cache_rows_per_shard": 16}
  teacher_cache.build_cache(tiny_run.tiny_config(assets, **exact), progress=False, log=None)
  online, cached = os.path.join(tmp, "online"), os.path.join(tmp, "cached")
  trainer.train(tiny_run.tiny_config(assets, **exact), online)
  trainer.train(tiny_run.tiny_config(assets, **exact, **{"teacher.source": "cache"}), cached)
  return {**shared, "tmp": tmp, "vocab": vocab, "exact": exact, "online": online, "cached": cached}


def _cached_overrides(env, **more):
  return {**env["exact"], "teacher.source": "cache", **more}


# ---- the loss --------------------------------------------------------------------------------


def _cache_of(teacher_logits, k):
  lp = jax.nn.log_softmax(teacher_logits, -1)
  vals, ids = jax.lax.top_k(lp, k)
  b, s, _ = ids.shape
  in_k = jnp.zeros(lp.shape, bool).at[jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None], ids].set(True)
  tail = jax.nn.logsumexp(jnp.where(in_k, -1e30, lp), -1)
  return losses.CachedTeacher(ids, vals, tail)


@pytest.mark.parametrize("divergence", losses.CACHE_DIVERGENCES)
def test_cached_kd_loss_chunked_matches_naive_and_online(divergence):
  """Values and gradients of the chunked cached loss equal the naive k+1-bucket loss (autodiff), for k < V
  and with a padded student head; with k = V both equal the online loss."""
  rng = np.random.default_rng(0)
  b, s, h, ht, vocab, valid = 2, 9, 8, 6, 41, 37
  hs = jnp.asarray(rng.normal(size=(b, s, h)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(h, vocab)), jnp.float32)
  t_hidden = jnp.asarray(rng.normal(size=(b, s, ht)) * 2, jnp.float32)
  t_head = jnp.asarray(rng.normal(size=(ht, vocab)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, valid, (b, s)), jnp.int32)
  mask = jnp.asarray(rng.random((b, s)) > 0.2)
  z_t = (t_hidden @ t_head)[..., :valid]
  kw = {"divergence": divergence, "valid_vocab": valid}
  for temperature in (1.0, 2.5):
    for k in (7, valid):
      cached = _cache_of(z_t, k)

      def naive(h_, w_):
        ce, kl = losses.kd_token_losses_cached(h_, w_, cached, targets, mask, temperature=temperature, **kw)
        return jnp.sum(ce) + 0.7 * jnp.sum(kl), (ce, kl)

      def chunked(h_, w_):
        return chunked_loss.chunked_kd_loss_sum_cached(h_, w_, cached, targets, mask, temperature=temperature,
                                                       gamma=0.7, chunk_size=8, **kw)

      grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hs, ws)
      (v1, (ce1, kl1)), g1 = grad(naive)
      (v2, (ce2, kl2)), g2 = grad(chunked)
      np.testing.assert_allclose(kl2, kl1, rtol=1e-5, atol=2e-5)
      np.testing.assert_allclose(ce2, ce1, rtol=1e-5, atol=1e-5)
      for a, c in zip(g2, g1):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=3e-5)
      assert float(jnp.max(jnp.abs(g2[1][:, valid:]))) == 0.0  # padded vocabulary rows get no gradient
      if k == valid:
        def online(h_, w_):
          return chunked_loss.chunked_kd_loss_sum(h_, w_, t_hidden, t_head, targets, mask, temperature=temperature,
                                                  gamma=0.7, chunk_size=8, **kw)
        (v3, (_, kl3)), g3 = grad(online)
        np.testing.assert_allclose(kl2, kl3, rtol=1e-5, atol=2e-5)
        for a, c in zip(g2, g3):
          np.testing.assert_allclose(a, c, rtol=1e-4, atol=3e-5)


def test_akl_is_refused_with_a_cache():
  from ddk_jax import train_step as ts
  from ddk_jax.config_validation import ConfigError
  from ddk_jax.settings import Settings
  spec = ts.LossSpec(divergence="akl")
  z = jnp.zeros((1, 2, 4))
  cached = losses.CachedTeacher(jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2)), jnp.zeros((1, 2)))
  with pytest.raises(ValueError, match="cannot be computed from a top-k teacher cache"):
    spec.loss_sum_cached(z, jnp.zeros((4, 4)), cached, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)))
  from ddk_jax.config_defaults import base_config
  c = base_config()
  c.teacher.source, c.teacher.cache_dir, c.loss.divergence = "cache", "/tmp/x", "akl"
  with pytest.raises(ConfigError, match="loss.divergence='akl' cannot be computed from a top-k teacher cache"):
    Settings.from_config(c, 1)
  c.loss.divergence, c.teacher.cache_dir = "forward_kl", ""
  with pytest.raises(ConfigError, match="teacher.cache_dir"):
    Settings.from_config(c, 1)


def test_cached_step_reports_the_teacher_ce_for_the_train_signal(shared):
  """The cached step reports the per-domain teacher CE of ddk.signal='train' from the cached target
  log-probabilities: with float32 values, the online step's numbers (and the same loss parts)."""
  import optax
  from ddk_jax import data, sharding, train_step as ts
  from ddk_jax.config_validation import model_config
  cfg = tiny_run.tiny_config(shared["assets"])
  tcfg, scfg = model_config(cfg, "teacher"), model_config(cfg, "student")
  host = data.build_train_iterator(cfg.data, process_index=0, process_count=1).next_batch(8)
  host = {k: v for k, v in host.items()}
  mesh, rules = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), sharding.DEFAULT_RULES
  t_sh, s_sh = ts.params_shardings(tcfg, mesh, rules), ts.params_shardings(scfg, mesh, rules)
  teacher = ts.init_params_sharded(tcfg, jax.random.key(1), t_sh)
  out = jax.device_get(teacher_cache.topk_fn(tcfg, 400, 400)(teacher, host))
  cached = dict(host, cache_row=np.arange(8, dtype=np.int32), teacher_ids=out["ids"].astype(np.uint16),
                teacher_logp=out["logp"], teacher_tail=out["tail"], teacher_target=out["target"])
  opt = optax.adamw(1e-3)
  got = {}
  for cache in (False, True):
    params = ts.init_params_sharded(scfg, jax.random.key(0), s_sh)
    state_sh = ts.state_shardings(s_sh, opt, params, mesh)
    state = jax.jit(lambda p: ts.init_train_state(p, opt), out_shardings=state_sh)(params)
    step = ts.jit_train_step(ts.make_train_step(scfg, None if cache else tcfg, opt,
                                                ts.StepOptions(num_domains=3, mode="ddk", teacher_cache=cache)),
                             state_sh, None if cache else t_sh, mesh, rules, teacher_cache=cache)
    batch = sharding.host_batch_to_global(cached if cache else host, mesh, rules)
    _, m = step(state, None if cache else teacher, batch)
    got[cache] = jax.device_get(m)
  for key in ("domain_teacher_ce_sum", "domain_ce_sum", "domain_kl_sum"):
    np.testing.assert_allclose(got[True][key], got[False][key], rtol=1e-5, atol=1e-5)
  assert np.all(got[True]["domain_teacher_ce_sum"] > 0)


# ---- keyed rows --------------------------------------------------------------------------------


def test_keyed_rows_number_the_stream_and_resume(shared):
  """With row_extras the rows carry their index in the domain's stream (kept in the iterator state);
  without, rows and states are the online path's."""
  from ddk_jax import data
  from ddk_jax.train_step import ROW_KEYS
  cfg = tiny_run.tiny_config(shared["assets"])
  plain = data.build_train_iterator(cfg.data, process_index=0, process_count=1)
  assert set(plain.next_batch(4)) == set(ROW_KEYS)
  assert "cache_row" not in json.dumps(plain.get_state())
  seen = []

  def extras(domain_id, row_index, row):
    seen.append((domain_id, row_index))
    return {"teacher_tail": np.full(row["inputs"].shape, row_index, np.float32)}

  it = data.build_train_iterator(cfg.data, process_index=0, process_count=1, row_extras=extras)
  first = it.next_batch(24)
  state = json.loads(json.dumps(it.get_state()))
  rest = it.next_batch(24)
  for domain in range(3):
    got = [int(r) for d, r in zip(np.concatenate([first["domain_id"], rest["domain_id"]]),
                                  np.concatenate([first["cache_row"], rest["cache_row"]])) if d == domain]
    assert got == list(range(len(got)))  # 0, 1, 2, ... per domain, whatever the mixture draws
  assert [(int(d), int(r)) for d, r in zip(first["domain_id"], first["cache_row"])] == seen[:24]
  np.testing.assert_array_equal(first["teacher_tail"][:, 0], first["cache_row"])
  again = data.build_train_iterator(cfg.data, process_index=0, process_count=1, row_extras=extras)
  again.set_state(state)
  replay = again.next_batch(24)
  for k in rest:
    np.testing.assert_array_equal(replay[k], rest[k])
  for k in ROW_KEYS:  # the rows themselves are the online path's
    np.testing.assert_array_equal(first[k], data.build_train_iterator(cfg.data, process_index=0,
                                                                      process_count=1).next_batch(24)[k])


# ---- the tiny run: exactness, resume -------------------------------------------------------------


def test_k_equal_to_the_vocab_matches_the_online_teacher(env):
  online, cached = _train_rows(env["online"]), _train_rows(env["cached"])
  assert [r["step"] for r in cached] == list(range(1, STEPS + 1))
  assert max(_epochs(env["cached"], STEPS, env["assets"])) > 1.5  # rows of a domain's second epoch were served
  worst = max(abs(a[k] - b[k]) for a, b in zip(online, cached) for k in ("loss", "ce", "kl"))
  assert worst <= 1e-5, worst
  assert all(r["kl"] > 0 for r in cached)
  rows = lambda w: [[r[f"rows/{d}"] for d in tiny_run.DOMAINS] for r in _train_rows(w)]
  assert rows(env["cached"]) == rows(env["online"])  # the same mixture draws
  teacher = lambda w: [r for r in tiny_run.metrics(w) if r["kind"] == "teacher_eval"]
  assert len(teacher(env["cached"])) == 1
  a, b = teacher(env["online"])[0], teacher(env["cached"])[0]
  assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}


def test_evaluate_scores_the_teacher_a_cached_run_was_distilled_from(env, tmp_path):
  """A cached run never loaded its teacher: evaluate scores the one the cache was made from (its
  manifest names it), giving the online run's teacher numbers; without the manifest it says what to pass."""
  from ddk_jax import evaluate
  cfg = tiny_run.tiny_config(env["assets"], **env["exact"])
  online = evaluate.evaluate_checkpoint(cfg, workdir=env["online"], teacher=True)
  cached = evaluate.evaluate_checkpoint(cfg, workdir=env["cached"], teacher=True)
  assert cached["teacher"]["source"] == online["teacher"]["source"] != "cache"
  for d in tiny_run.DOMAINS:
    assert cached["domains"][d]["teacher_ce"] == online["domains"][d]["teacher_ce"]
  moved = str(tmp_path / "cached")
  shutil.copytree(env["cached"], moved)
  meta = os.path.join(moved, "checkpoints", str(STEPS), "meta", "metadata")
  with open(meta) as f:
    saved = json.load(f)
  saved["config"]["teacher"]["cache_dir"] = str(tmp_path / "gone")
  with open(meta, "w") as f:
    json.dump(saved, f)
  with pytest.raises(evaluate.EvaluationError, match="came from the cache in .*gone.*--noteacher"):
    evaluate.evaluate_checkpoint(cfg, workdir=moved, teacher=True)


def _rows_per_epoch(assets) -> dict:
  with open(os.path.join(assets, "prepared", "manifest.json")) as f:
    manifest = json.load(f)
  return {d: manifest["domains"][d]["train"]["target_tokens"] / SEQ for d in tiny_run.DOMAINS}


def _epochs(workdir, step, assets) -> list[float]:
  """Epochs of each domain's row stream drawn by the mixture up to `step` (its checkpointed data state)."""
  with open(os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")) as f:
    parents = json.load(f)["parents"]
  per_epoch = _rows_per_epoch(assets)
  return [p["cache_row"] / per_epoch[d] for p, d in zip(parents, tiny_run.DOMAINS)]


@pytest.mark.devices(8)
def test_sigkill_and_rerun_of_a_cached_run_is_bit_identical(env, tmp_path):
  config = tiny_run.write_config_file(str(tmp_path / "config.py"), env["assets"], **_cached_overrides(env))
  penv = tiny_run.env_for(8, cache_dir=env["jax_cache"])
  run, log = str(tmp_path / "run"), str(tmp_path / "run.log")
  proc = tiny_run.start(config, run, env=penv, log_path=log)
  try:
    tiny_run.wait_for_train_step(run, 14, proc, timeout=TIMEOUT)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  done = tiny_run.run(config, run, env=penv, timeout=TIMEOUT)
  assert done.returncode == 0, done.stderr[-3000:]
  resumed = [int(x.split("at step ")[1].split()[0]) for x in done.stderr.splitlines() if "resumed from" in x]
  assert resumed and 0 < resumed[0] < STEPS
  # Resumed inside an epoch of every domain; the run goes on past the first epoch of some domain.
  epochs = _epochs(run, resumed[0], env["assets"])
  assert all(abs(e - round(e)) > 1e-3 for e in epochs), epochs
  assert max(_epochs(run, STEPS, env["assets"])) > 1
  assert tiny_run.comparable_metrics(run) == tiny_run.comparable_metrics(env["cached"])
  state, meta = tiny_run.read_checkpoint(run, STEPS)
  ref_state, ref_meta = tiny_run.read_checkpoint(env["cached"], STEPS)
  tiny_run.assert_same_state(state, ref_state)
  assert meta["controller"] == ref_meta["controller"]
  name = os.path.join("checkpoints", str(STEPS), "data", "process_0-of-1.json")
  with open(os.path.join(run, name)) as f, open(os.path.join(env["cached"], name)) as g:
    assert json.load(f) == json.load(g)


# ---- k = 64: the bound -----------------------------------------------------------------------


def test_top_64_kd_term_is_a_lower_bound_off_by_the_tail_term(env):
  """At T = 1, KL(P || Q) - KL(P_b || Q_b) = P_tail * KL(P_tail / P_tail || Q_tail / Q_tail) >= 0 for each
  token (the chain rule of the KL over the k+1 buckets); float16 values move the batch's term by < 0.1%.
  On the tiny run's first 64 rows (random teacher, top-64 holding about a fifth of its mass) the
  cached term is 0.35 of the full one (docs/teacher_cache.md)."""
  from ddk_jax import data, model as model_lib
  from ddk_jax.config_validation import model_config
  cfg = tiny_run.tiny_config(env["assets"])
  tcfg, scfg = model_config(cfg, "teacher"), model_config(cfg, "student")
  tp, sp = model_lib.init_params(tcfg, jax.random.key(1)), model_lib.init_params(scfg, jax.random.key(0))
  batch = data.build_train_iterator(cfg.data, process_index=0, process_count=1).next_batch(64)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  mask = batch["segment_ids"] != 0
  fwd = lambda p, c: model_lib.apply_hidden(p, c, batch["inputs"], batch["positions"], batch["segment_ids"])
  hs, ws, ht, wt = fwd(sp, scfg), model_lib.head_weight(sp, scfg), fwd(tp, tcfg), model_lib.head_weight(tp, tcfg)
  _, (_, kl_full) = chunked_loss.chunked_kd_loss_sum(hs, ws, ht, wt, batch["targets"], mask, temperature=1.0,
                                                     gamma=1.0)
  out = teacher_cache.topk_fn(tcfg, 64, env["vocab"])(tp, batch)
  kd = lambda dtype: chunked_loss.chunked_kd_loss_sum_cached(
      hs, ws, losses.CachedTeacher(out["ids"], out["logp"].astype(dtype), out["tail"].astype(dtype)),
      batch["targets"], mask, temperature=1.0, gamma=1.0)[1][1]
  kl_cached, kl_f16 = kd(jnp.float32), kd(jnp.float16)
  # The tail term from the full distributions (float64).
  lp = np.asarray(jax.nn.log_softmax(ht @ wt, -1), np.float64)
  lq = np.asarray(jax.nn.log_softmax(hs @ ws, -1), np.float64)
  in_k = np.zeros(lp.shape, bool)
  np.put_along_axis(in_k, np.asarray(out["ids"]), True, -1)
  p_tail = np.where(in_k, 0, np.exp(lp)).sum(-1)
  q_tail = np.where(in_k, 0, np.exp(lq)).sum(-1)
  tail_kl = np.where(in_k, 0, np.exp(lp) / p_tail[..., None] * (lp - np.log(p_tail)[..., None]
                                                                 - lq + np.log(q_tail)[..., None])).sum(-1)
  gap = np.asarray(kl_full, np.float64) - np.asarray(kl_cached, np.float64)
  m = np.asarray(mask)
  np.testing.assert_allclose(gap[m], (p_tail * tail_kl)[m], rtol=1e-3, atol=1e-6)
  assert np.all(gap[m] >= -1e-6)
  ratio = float(np.asarray(kl_cached)[m].sum() / np.asarray(kl_full)[m].sum())
  assert 0.3 < ratio < 0.4, ratio
  # float16 storage moves single tokens' values by up to ~0.3% here, the batch's KD term by far less.
  assert abs(float(np.asarray(kl_f16)[m].sum()) / float(np.asarray(kl_cached)[m].sum()) - 1) < 1e-3
  assert 0.15 < float(np.mean(1 - p_tail[m])) < 0.25


# ---- files, checks ------------------------------------------------------------------------------


def test_truncated_shard_names_its_file_and_a_rerun_repairs_it(env, tmp_path):
  copy = str(tmp_path / "cache")
  shutil.copytree(env["exact"]["teacher.cache_dir"], copy)
  shard = os.path.join(copy, "long", "p0-of-1", "shard-00002.array_record")
  original = open(shard, "rb").read()
  os.truncate(shard, len(original) // 2)
  with pytest.raises(teacher_cache.TeacherCacheError, match=f"{shard} is truncated or damaged"):
    teacher_cache.open_cache(copy)
  with tiny_run.compilation_cache(env["jax_cache"]):
    teacher_cache.build_cache(tiny_run.tiny_config(env["assets"], **{**env["exact"], "teacher.cache_dir": copy}),
                              progress=False, log=None)
  assert open(shard, "rb").read() == original
  cache = teacher_cache.open_cache(copy)
  crc, ids, logp, tail, target = cache.read(1, 40)
  assert ids.shape == logp.shape == (SEQ, env["vocab"]) and tail.shape == target.shape == (SEQ,)


def test_finished_cache_is_reused_without_the_teacher(env, monkeypatch):
  from ddk_jax import run_setup
  monkeypatch.setattr(run_setup, "_load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
  lines = []
  manifest = teacher_cache.build_cache(tiny_run.tiny_config(env["assets"], **env["exact"]), progress=False,
                                       log=lines.append)
  assert "is complete" in lines[-1] and manifest["rows_per_domain"] == STEPS * 8


def _open(env, tokenizer=None, data_manifest=None, **overrides):
  from ddk_jax import data
  from ddk_jax.settings import Settings
  cfg = tiny_run.tiny_config(env["assets"], **_cached_overrides(env, **overrides))
  settings = Settings.from_config(cfg, jax.device_count())
  tok = tokenizer or data.load_tokenizer_from_config(cfg.data)
  # The prepared data of the cache's config (another data.seed would be prepared elsewhere).
  made = data.load_manifest(tiny_run.tiny_config(env["assets"]).data.prepared_dir)
  return teacher_cache.open_for_run(cfg, settings, tok, data_manifest or made, student_vocab_size=400)


def test_cache_of_another_setup_is_refused_naming_what_differs(env):
  from ddk_jax import data
  # The same teacher and rows: another mode, student or mixture weights reads it.
  assert _open(env, **{"mode": "kd", "student.model.num_layers": 2}).rows == STEPS * 8
  for overrides, what in (({"teacher.model.num_layers": 3}, "teacher.model.num_layers: cache 2, this config 3"),
                          ({"seed": 5}, "seed (a random teacher is initialised from seed + 1): cache 0, this config 5"),
                          ({"data.seq_len": 32}, "data.seq_len: cache 64, this config 32"),
                          ({"data.seed": 3}, "data.seed: cache 0, this config 3"),
                          ({"teacher.cache_top_k": 64}, "teacher.cache_top_k"),
                          ({"steps": 2 * STEPS}, "this run may need 320")):
    with pytest.raises(teacher_cache.TeacherCacheError) as e:
      _open(env, **overrides)
    assert what in str(e.value), (what, str(e.value))
  tok = data.load_tokenizer_from_config(tiny_run.tiny_config(env["assets"]).data)
  other_tok = types.SimpleNamespace(hash="0" * 64, max_id=tok.max_id)
  with pytest.raises(teacher_cache.TeacherCacheError, match=r"the tokenizer \(data.tokenizer\)"):
    _open(env, tokenizer=other_tok)
  manifest = json.loads(json.dumps(data.ensure_prepared(tiny_run.tiny_config(env["assets"]).data)))
  manifest["domains"]["short"]["train"]["documents"] += 1
  with pytest.raises(teacher_cache.TeacherCacheError, match="the prepared data"):
    _open(env, data_manifest=manifest)
  with pytest.raises(teacher_cache.TeacherCacheError, match="made for 1 processes, this run has 2"):
    teacher_cache.open_cache(env["exact"]["teacher.cache_dir"], process_index=0, process_count=2)
  with pytest.raises(teacher_cache.TeacherCacheError, match="no finished teacher cache"):
    teacher_cache.open_cache(env["tmp"])


def test_training_refuses_a_cache_of_another_teacher_before_any_step(env, tmp_path):
  cfg = tiny_run.tiny_config(env["assets"], **_cached_overrides(env, **{"teacher.model.hidden_size": 48}))
  with pytest.raises(trainer.TrainingError, match="teacher.model.hidden_size: cache 32, this config 48"):
    trainer.train(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")


# ---- the CLI --------------------------------------------------------------------------------------


def _cli(config, *flags, timeout=TIMEOUT):
  return subprocess.run([sys.executable, "-m", "ddk_jax.teacher_cache", f"--config={config}", *flags],
                        cwd=tiny_run.REPO, env=tiny_run.env_for(1), capture_output=True, text=True, timeout=timeout)


def test_cli_writes_reuses_and_reports_user_errors(env, tmp_path):
  cache_dir = str(tmp_path / "cli_cache")
  config = tiny_run.write_config_file(str(tmp_path / "c.py"), env["assets"], **{
      "steps": 2, "mode": "kd", "teacher.cache_dir": cache_dir, "teacher.cache_top_k": 8})
  first = _cli(config)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(os.path.join(cache_dir, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["rows_per_domain"] == 16 and manifest["record"]["top_k"] == 8
  assert manifest["record"]["dtype"] == "float16" and manifest["record"]["id_dtype"] == "uint16"
  again = _cli(config)
  assert again.returncode == 0 and "is complete" in again.stdout, again.stderr[-3000:]

  bad = tiny_run.write_config_file(str(tmp_path / "bad.py"), env["assets"], **{
      "teacher.source": "cache", "teacher.cache_dir": cache_dir})
  for args, what in (((bad,), "teacher.source='cache' reads a teacher cache"),
                     ((config, "--config.teacher.cache_top_k=5000"), "teacher.cache_top_k=5000 is more than")):
    proc = _cli(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith("ddk_jax.teacher_cache: error: ") and what in lines[-1], lines[-3:]
    assert "Traceback" not in proc.stderr


# ---- two processes ---------------------------------------------------------------------------------

TWO_STEPS = 6
# Two processes (jax.distributed over loopback), one CPU device each; params and batch sharded over both.
TWO_PROCESS = {"steps": TWO_STEPS, "ddk.interval": 3, "checkpoint.every": 3, "mesh.data": 1, "mesh.fsdp": 2,
               "mesh.tensor": 1}


def _start_pair(command, logs, cache_dir):
  port = tiny_run.free_port()
  procs = []
  for pid in range(2):
    env = tiny_run.env_for(1, cache_dir=cache_dir, DDK_COORDINATOR=f"127.0.0.1:{port}", DDK_NUM_PROCESSES="2",
                           DDK_PROCESS_ID=str(pid))
    with open(f"{logs}.p{pid}.log", "ab") as log:
      procs.append(subprocess.Popen(command, cwd=tiny_run.REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _finish_pair(procs, logs, what):
  for pid, proc in enumerate(procs):
    try:
      rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      rc = None
    if rc != 0:
      for p in procs:
        if p.poll() is None:
          p.kill()
      with open(f"{logs}.p{pid}.log", errors="replace") as f:
        pytest.fail(f"{what}, process {pid}: exit {rc}\n{f.read()[-6000:]}")


def test_two_processes_write_their_own_slices_and_train_from_the_cache(shared, tmp_path):
  """`python -m ddk_jax.teacher_cache` on two processes: each writes its own rows (`p<i>-of-2/`), the
  manifest covers both; a two-process run reading the cache (k = the vocabulary, float32) matches the
  same two-process run with the online teacher within 1e-5 per step, with the same mixture draws."""
  from ddk_jax import data
  from ddk_jax.data import pipeline
  assets = shared["assets"]
  vocab = data.load_tokenizer_from_config(tiny_run.tiny_config(assets).data).max_id + 1
  cache_dir = str(tmp_path / "cache")
  exact = {**TWO_PROCESS, "teacher.cache_dir": cache_dir, "teacher.cache_top_k": vocab,
           "teacher.cache_dtype": "float32", "teacher.cache_rows_per_shard": 8}
  config = tiny_run.write_config_file(str(tmp_path / "config.py"), assets, **exact)
  online, cached = str(tmp_path / "online"), str(tmp_path / "cached")
  logs = lambda name: str(tmp_path / name)
  # The online pair runs alongside the cache writers (each pair idles while one of its processes compiles).
  procs = []
  try:
    procs = _start_pair(tiny_run.main_command(config, online), logs("online"), shared["jax_cache"])
    writers = _start_pair([sys.executable, "-m", "ddk_jax.teacher_cache", f"--config={config}"], logs("write"),
                          shared["jax_cache"])
    procs += writers
    _finish_pair(writers, logs("write"), "the cache writer")
    _finish_pair(procs[:2], logs("online"), "the online run")
    procs = _start_pair(tiny_run.main_command(config, cached, "--config.teacher.source=cache"), logs("cached"),
                        shared["jax_cache"])
    _finish_pair(procs, logs("cached"), "the cached run")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()

  # Each process wrote its own slice of every domain; the manifest says two processes and covers them.
  with open(os.path.join(cache_dir, "manifest.json")) as f:
    manifest = json.load(f)
  rows = TWO_STEPS * 8 // 2  # the rows a process draws in the run, all from one domain at worst
  assert manifest["identity"]["process_count"] == 2 and manifest["rows_per_domain"] == rows
  assert manifest["rows_per_shard"] == 8 and manifest["domains"] == list(tiny_run.DOMAINS)
  assert manifest["record"] == {"seq_len": 32, "top_k": vocab, "id_dtype": "uint16", "dtype": "float32"}
  assert [(v["eval_max_rows"], len(v["losses"])) for v in manifest["validation"].values()] == [(0, 3)]
  with open(os.path.join(cache_dir, "cache.json")) as f:
    assert json.load(f)["fingerprint"] == manifest["fingerprint"]
  cfg = tiny_run.tiny_config(assets, **exact)
  data_manifest = data.load_manifest(cfg.data.prepared_dir)
  for d, spec in enumerate(data.domain_specs(cfg.data)):
    assert sorted(os.listdir(os.path.join(cache_dir, spec.name))) == ["p0-of-2", "p1-of-2"]
    crcs = []
    for pid in range(2):
      files = sorted(os.listdir(os.path.join(cache_dir, spec.name, f"p{pid}-of-2")))
      assert files == [f"shard-0000{k}.{ext}" for k in range(3) for ext in ("array_record", "json")], files
      for k in range(3):
        with open(os.path.join(cache_dir, spec.name, f"p{pid}-of-2", f"shard-0000{k}.json")) as f:
          marker = json.load(f)
        assert marker["fingerprint"] == manifest["fingerprint"]
        assert (marker["rows"], marker["first_row"]) == (8, 8 * k)
      cache = teacher_cache.open_cache(cache_dir, process_index=pid, process_count=2)
      # The entries are the rows of this process's stream, in order.
      stream = iter(pipeline.domain_rows(
          cfg.data.prepared_dir, data_manifest, spec.name, domain_id=spec.domain_id, split="train",
          seq_len=32, process_index=pid, process_count=2, seed=int(cfg.data.seed), shuffle=bool(cfg.data.shuffle),
          keyed=True))
      got = [cache.read(d, i)[0] for i in range(rows)]
      assert got == [teacher_cache.row_crc(next(stream)) for _ in range(rows)]
      crcs.append(got)
    assert crcs[0] != crcs[1]  # the two processes' slices hold other rows

  # Training from the cache on the same two processes is the online run.
  a, b = _train_rows(online), _train_rows(cached)
  assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, TWO_STEPS + 1))
  worst = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("loss", "ce", "kl"))
  assert worst <= 1e-5, worst
  assert all(r["kl"] > 0 for r in b)
  draws = lambda rs: [[r[f"rows/{d}"] for d in tiny_run.DOMAINS] for r in rs]
  assert draws(a) == draws(b)
  teacher = lambda w: [{k: v for k, v in r.items() if k != "time"} for r in tiny_run.metrics(w)
                       if r["kind"] == "teacher_eval"]
  assert len(teacher(cached)) == 1 and teacher(cached) == teacher(online)
