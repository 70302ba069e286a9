"""The controller's training-batch signal (ddk.signal="train", docs/ddk.md).

* The train step's per-domain student and teacher CE sums equal the eval step's on the same
  rows with the same (pre-update) params, for both loss implementations.
* `ddk.window_signal`: window means, the running mean (signal_ema), domains without rows.
* Two processes, each holding half of every training batch, compute bit-identical weights.
* A run with the train signal: no validation for the controller, updates at K, 2K, ... from
  the training batches, "signal" rows beside the validations; preempted and resumed, it is
  bit-identical to the uninterrupted run (the window and the running means are in LogState).
* Config errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import tiny_run
from ddk_jax import ddk, sharding, train_step as ts, trainer
from ddk_jax.config_validation import ConfigError, validate_config
from ddk_jax.controller import MixtureController
from ddk_jax.model import ModelConfig

STUDENT = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      param_dtype="float32", compute_dtype="float32")
# A teacher with a larger (padded) vocabulary, scored on the student's, as in a real pair.
TEACHER = ModelConfig(vocab_size=160, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=4,
                      param_dtype="float32", compute_dtype="float32")
NUM_DOMAINS = 3


def _batch(b=8, s=16, seed=0, vocab=120):
  """Packed rows (two documents and a padded tail each), domains 0, 1, 2, 0, ...; ids < vocab."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, s), np.int32)
  pos = np.zeros((b, s), np.int32)
  for r in range(b):
    cut, end = rng.integers(3, s - 4), s - rng.integers(0, 3)
    seg[r, :cut], seg[r, cut:end] = 1, 2
    pos[r, :cut], pos[r, cut:end] = np.arange(cut), np.arange(end - cut)
  return {"inputs": rng.integers(0, vocab, (b, s)).astype(np.int32),
          "targets": rng.integers(0, vocab, (b, s)).astype(np.int32), "segment_ids": seg, "positions": pos,
          "domain_id": (np.arange(b) % NUM_DOMAINS).astype(np.int32)}


# ----------------------------------------------------------------------------
# the train step's signal equals the eval step's numbers on the same rows
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl,temperature,accum", [("chunked", 1.0, 1), ("chunked", 2.0, 2), ("naive", 2.0, 1)])
def test_train_step_signal_equals_the_eval_step_on_the_same_rows(impl, temperature, accum):
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  rules = sharding.DEFAULT_RULES
  # valid_vocab 120 < 128 (student) < 160 (teacher): both CEs use the tokenizer's 120 ids.
  spec = ts.LossSpec(impl=impl, chunk_size=32, gamma=0.5, temperature=temperature, valid_vocab=120)
  opts = ts.StepOptions(num_domains=NUM_DOMAINS, mode="ddk", grad_accum=accum, loss=spec)
  optimizer = optax.adamw(1e-2)
  s_sh, t_sh = ts.params_shardings(STUDENT, mesh, rules), ts.params_shardings(TEACHER, mesh, rules)
  params = ts.init_params_sharded(STUDENT, jax.random.key(0), s_sh)
  teacher = ts.init_params_sharded(TEACHER, jax.random.key(1), t_sh)
  state_sh = ts.state_shardings(s_sh, optimizer, params, mesh)
  state = jax.jit(lambda p: ts.init_train_state(p, optimizer), out_shardings=state_sh)(params)
  step = ts.jit_train_step(ts.make_train_step(STUDENT, TEACHER, optimizer, opts), state_sh, t_sh, mesh, rules)
  eval_opts = dataclasses.replace(opts, mode="cpt")  # as run_setup builds them
  eval_student = ts.jit_eval_step(ts.make_eval_step(STUDENT, eval_opts), s_sh, mesh, rules)
  eval_teacher = ts.jit_eval_step(ts.make_eval_step(TEACHER, eval_opts, vocab_size=STUDENT.vocab_size), t_sh, mesh,
                                  rules)
  for i in range(2):  # the second step's params are trained ones
    batch = sharding.host_batch_to_global(_batch(seed=i), mesh, rules)
    s_sum, s_count = jax.device_get(eval_student(state["params"], batch))  # before the step's update
    t_sum, _ = jax.device_get(eval_teacher(teacher, batch))
    state, m = step(state, teacher, batch)
    m = jax.device_get(m)
    np.testing.assert_array_equal(m["domain_count"], s_count)
    assert s_count.min() > 0
    np.testing.assert_allclose(m["domain_ce_sum"] / m["domain_count"], s_sum / s_count, rtol=2e-6)
    np.testing.assert_allclose(m["domain_teacher_ce_sum"] / m["domain_count"], t_sum / s_count, rtol=2e-6)
    assert not np.allclose(m["domain_teacher_ce_sum"], m["domain_ce_sum"], rtol=1e-3)


def test_the_step_without_a_teacher_reports_no_teacher_ce():
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  rules = sharding.DEFAULT_RULES
  opts = ts.StepOptions(num_domains=NUM_DOMAINS, mode="cpt")
  optimizer = optax.sgd(0.1)
  s_sh = ts.params_shardings(STUDENT, mesh, rules)
  params = ts.init_params_sharded(STUDENT, jax.random.key(0), s_sh)
  state_sh = ts.state_shardings(s_sh, optimizer, params, mesh)
  state = jax.jit(lambda p: ts.init_train_state(p, optimizer), out_shardings=state_sh)(params)
  step = ts.jit_train_step(ts.make_train_step(STUDENT, None, optimizer, opts), state_sh, None, mesh, rules)
  _, m = step(state, None, sharding.host_batch_to_global(_batch(), mesh, rules))
  assert "domain_teacher_ce_sum" not in m and "domain_ce_sum" in m


# ----------------------------------------------------------------------------
# ddk.window_signal
# ----------------------------------------------------------------------------

NAN = float("nan")


def test_window_signal_is_the_window_mean_per_domain():
  ls, lt, run_s, run_t, measured = ddk.window_signal([6.0, 2.0, 9.0], [3.0, 1.0, 6.0], [2.0, 1.0, 3.0],
                                                     [NAN] * 3, [NAN] * 3)
  np.testing.assert_array_equal(ls, [3.0, 2.0, 3.0])
  np.testing.assert_array_equal(lt, [1.5, 1.0, 2.0])
  np.testing.assert_array_equal(run_s, ls)
  np.testing.assert_array_equal(run_t, lt)
  assert measured.all()
  # signal_ema = 1: the previous values play no part
  again = ddk.window_signal([6.0, 2.0, 9.0], [3.0, 1.0, 6.0], [2.0, 1.0, 3.0], [9.0] * 3, [9.0] * 3)
  np.testing.assert_array_equal(again[0], ls)


def test_window_signal_running_mean_and_domains_without_rows():
  prev_s, prev_t = [2.5, 4.0, NAN], [2.0, 3.0, NAN]
  # domain 1 had no rows; domain 2 never had any
  ls, lt, run_s, run_t, measured = ddk.window_signal([6.0, 0.0, 0.0], [3.0, 0.0, 0.0], [2.0, 0.0, 0.0],
                                                     prev_s, prev_t, ema=0.25)
  want0_s, want0_t = 0.25 * 3.0 + 0.75 * 2.5, 0.25 * 1.5 + 0.75 * 2.0
  np.testing.assert_array_equal(run_s, [want0_s, 4.0, NAN])
  np.testing.assert_array_equal(run_t, [want0_t, 3.0, NAN])
  assert measured.tolist() == [True, True, False]
  # the never-measured domain counts as an average one: the window's pooled means
  np.testing.assert_array_equal(ls, [want0_s, 4.0, 6.0 / 2.0])
  np.testing.assert_array_equal(lt, [want0_t, 3.0, 3.0 / 2.0])
  # a first measurement starts the running mean at the window's mean, whatever the ema
  ls2, _, run_s2, _, measured2 = ddk.window_signal([1.0, 0.0, 8.0], [1.0, 0.0, 4.0], [1.0, 0.0, 2.0],
                                                   run_s, run_t, ema=0.25)
  assert run_s2[2] == 4.0 and measured2.all()
  assert run_s2[0] == 0.25 * 1.0 + 0.75 * want0_s
  # no tokens at all: no signal, the running values unchanged
  none = ddk.window_signal([0.0] * 3, [0.0] * 3, [0.0] * 3, run_s2, run_s2, ema=0.5)
  assert none[0] is None and none[1] is None
  np.testing.assert_array_equal(none[2], run_s2)


def test_controller_update_with_teacher_losses_of_the_interval():
  c = MixtureController(["a", "b"], "ddk", signal="train")
  w = c.update(3, [3.0, 2.0], teacher_losses=[2.0, 1.0])
  x = np.array([1.5, 2.0])
  want = 0.5 * np.exp(x) / np.exp(x).sum() + 0.25
  np.testing.assert_allclose(w, want, rtol=0, atol=1e-15)
  assert c.history[-1]["teacher_loss"] == {"a": 2.0, "b": 1.0}
  assert c.teacher_losses is None  # the cached validation losses are not touched
  with pytest.raises(ValueError, match="needs the teacher"):
    c.update(6, [3.0, 2.0])
  with pytest.raises(ValueError, match="'b'"):
    c.update(6, [3.0, 2.0], teacher_losses=[2.0, 0.0])


# ----------------------------------------------------------------------------
# two processes: the train step's global sums give identical weights on both hosts
# ----------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    pid, port, nproc = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if nproc > 1:
      jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    import optax
    from ddk_jax import ddk, model, sharding, train_step as ts
    from ddk_jax.controller import MixtureController
    cfg = model.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                            num_kv_heads=1, param_dtype="float32", compute_dtype="float32")
    tcfg = model.ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=2, param_dtype="float32", compute_dtype="float32")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = sharding.DEFAULT_RULES
    optimizer = optax.sgd(0.1)
    s_sh, t_sh = ts.params_shardings(cfg, mesh, rules), ts.params_shardings(tcfg, mesh, rules)
    params = ts.init_params_sharded(cfg, jax.random.key(0), s_sh)
    teacher = ts.init_params_sharded(tcfg, jax.random.key(1), t_sh)
    state_sh = ts.state_shardings(s_sh, optimizer, params, mesh)
    state = jax.jit(lambda p: ts.init_train_state(p, optimizer), out_shardings=state_sh)(params)
    opts = ts.StepOptions(num_domains=3, mode="ddk")
    step = ts.jit_train_step(ts.make_train_step(cfg, tcfg, optimizer, opts), state_sh, t_sh, mesh, rules)
    rng = np.random.default_rng(0)
    rows_per_host = 6 // nproc
    sums = np.zeros((3, 3))  # student CE, teacher CE, tokens per domain
    for i in range(3):
      toks = rng.integers(1, 64, size=(6, 9)).astype(np.int32)
      seg = np.ones((6, 8), np.int32)
      seg[:, 7 - i:] = 0
      ids = np.array([0, 1, 2, 0, 0, 1], np.int32)  # no rows of domain 2 after step 0
      if i:
        ids[ids == 2] = 0
      full = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg,
              "positions": np.tile(np.arange(8, dtype=np.int32), (6, 1)), "domain_id": ids}
      mine = {k: v[pid * rows_per_host:(pid + 1) * rows_per_host] for k, v in full.items()}
      state, m = step(state, teacher, sharding.host_batch_to_global(mine, mesh, rules))
      m = jax.device_get(m)
      sums += np.stack([m["domain_ce_sum"], m["domain_teacher_ce_sum"], m["domain_count"]]).astype(np.float64)
    ls, lt, *_ = ddk.window_signal(sums[0], sums[1], sums[2], [np.nan] * 3, [np.nan] * 3)
    c = MixtureController(["web", "code", "wiki"], "ddk", signal="train")
    w = c.update(3, ls, teacher_losses=lt)
    print("RESULT " + json.dumps({"weights": [float(v) for v in w], "student": [float(v) for v in ls],
                                  "teacher": [float(v) for v in lt], "tokens": sums[2].tolist()}), flush=True)
    if nproc > 1:
      jax.distributed.shutdown()
""")


def _run_workers(nproc: int) -> list[dict]:
  port = str(tiny_run.free_port())
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=tiny_run.REPO, JAX_NUM_CPU_DEVICES="1")
  env.pop("XLA_FLAGS", None)
  outs = tiny_run.run_local_processes(lambda i: [sys.executable, "-c", _WORKER, str(i), port, str(nproc)], nproc,
                                      env=env, timeout=240, what="the two-process train steps")
  return [json.loads(tiny_run.result_line(out)) for out in outs]


def test_two_processes_compute_identical_weights_from_the_train_signal():
  two = _run_workers(2)
  assert two[0] == two[1]  # bit-identical on both hosts
  one = _run_workers(1)[0]  # all rows on one host
  # every token counted once: domain 0 has 3, 4, 4 rows in the 3 steps, of 7, 6, 5 tokens each
  assert two[0]["tokens"] == one["tokens"] == [3 * 7 + 4 * 6 + 4 * 5, 2 * (7 + 6 + 5), 7.0]
  np.testing.assert_allclose(two[0]["student"], one["student"], rtol=1e-6)
  np.testing.assert_allclose(two[0]["teacher"], one["teacher"], rtol=1e-6)
  np.testing.assert_allclose(two[0]["weights"], one["weights"], rtol=1e-6)


# ----------------------------------------------------------------------------
# config errors
# ----------------------------------------------------------------------------


def _demo(**overrides):
  from ddk_jax.cli import load_config_file
  cfg, err = load_config_file(os.path.join(tiny_run.REPO, "configs", "demo.py"))
  assert err is None, err
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.mark.parametrize("overrides,message", [
    ({"ddk.signal": "val"}, "ddk.signal='val': must be one of validation, train"),
    ({"ddk.signal": "train", "mode": "cpt"}, "mode=cpt has no teacher"),
    ({"ddk.signal_ema": 0.0}, "ddk.signal_ema=0.0: must be in (0, 1]"),
    ({"ddk.signal_ema": 1.5}, "ddk.signal_ema=1.5"),
    ({"ddk.discrepancy": "diff"}, "ddk.discrepancy='diff': must be one of ratio, excess"),
    ({"ddk.softmax_temperature": 0.0}, "ddk.softmax_temperature=0.0: must be > 0"),
    ({"ddk.floor": {"code": 0.5, "prose": 0.6}}, "the floors sum to 1.1 > 1 (code=0.5, prose=0.6)"),
    ({"ddk.floor": {"cdoe": 0.1}}, "ddk.floor: unknown domains ['cdoe']"),
    ({"ddk.floor": "0.1"}, "ddk.floor='0.1': must be a number in [0, 1]"),
    ({"ddk.cap": 0.1}, "ddk.cap"),
    ({"ddk.cap": 0.1}, "the caps sum to 0.5 < 1"),
    ({"ddk.cap": {"prose": -0.1}}, "ddk.cap.prose=-0.1: must be a number in [0, 1]"),
    ({"ddk.floor": {"prose": 0.3}, "ddk.cap": {"prose": 0.2}}, "prose (floor 0.3 > cap 0.2)"),
])
def test_ddk_config_errors_name_the_key_and_the_domains(overrides, message):
  with pytest.raises(ConfigError) as e:
    validate_config(_demo(**overrides), 1)
  assert message in str(e.value)


def test_floor_and_cap_by_domain_reach_the_settings():
  from ddk_jax.settings import Settings
  s = Settings.from_config(_demo(**{"ddk.floor": {"prose": 0.1}, "ddk.cap": 0.5, "ddk.signal": "train",
                                    "ddk.discrepancy": "excess"}), 1)
  names = [d["name"] for d in _demo().data.domains]
  assert s.ddk.floor == {n: (0.1 if n == "prose" else 0.0) for n in names}
  assert s.ddk.cap == 0.5 and s.ddk.signal == "train" and s.ddk.discrepancy == "excess"
  c = MixtureController(names, "ddk", **s.ddk.controller_options())
  assert c.floor.tolist() == [0.1 if n == "prose" else 0.0 for n in names] and c.cap.tolist() == [0.5] * len(names)


# ----------------------------------------------------------------------------
# a run with the train signal: outputs, then preempted and resumed
# ----------------------------------------------------------------------------

# 8 steps, updates at 3 and 6 from the training batches; eval.every = 2 scores the student on the
# validation rows at 2, 4, 6 (beside a "signal" row each) and the end.
SIGNAL_RUN = {"steps": 8, "ddk.interval": 3, "ddk.signal": "train", "ddk.signal_ema": 0.5, "eval.every": 2,
              "checkpoint.every": 2}


@pytest.fixture(scope="module")
def signal_env(tmp_path_factory):
  root = tiny_run.shared_root(tmp_path_factory)
  with tiny_run.compilation_cache(os.path.join(root, "jax_cache")):
    assets = tiny_run.shared_assets(root)
    tmp = str(tmp_path_factory.mktemp("signal"))
    ref = os.path.join(tmp, "reference")
    summary = trainer.train(tiny_run.tiny_config(assets, **SIGNAL_RUN), ref)
    yield {"assets": assets, "tmp": tmp, "ref": ref, "summary": summary}


def _rows(workdir, kind):
  return [r for r in tiny_run.metrics(workdir) if r["kind"] == kind]


def test_train_signal_run_updates_from_the_training_batches(signal_env):
  ref, summary = signal_env["ref"], signal_env["summary"]
  names = list(tiny_run.DOMAINS)
  assert summary["status"] == "done"
  # No update at step 0 (nothing trained yet) and no validation for the controller: the
  # student is scored at step 0 (the report's "before"), by eval.every (2, 4, 6, 8) and at the end.
  assert [r["step"] for r in _rows(ref, "weights")] == [3, 6]
  assert [r["step"] for r in _rows(ref, "eval")] == [0, 2, 4, 6, 8, 8]
  assert len(_rows(ref, "teacher_eval")) == 1
  signal_rows = _rows(ref, "signal")
  assert [r["step"] for r in signal_rows] == [2, 4, 6]  # validations during training
  for r in signal_rows:
    assert all(r[f"val_signal/{n}/teacher_ce"] > 0 for n in names)
    assert sum(r[f"train_signal/{n}/tokens"] for n in names) > 0
  _, meta = tiny_run.read_checkpoint(ref, 8)
  history = meta["controller"]["history"]
  assert [h["step"] for h in history] == [3, 6]
  # The signal row at 6 shows the window of the update at 6 (steps 3..5); the controller got
  # the running means: half this window, half the values of the update at 3 (signal_ema 0.5).
  row6 = next(r for r in signal_rows if r["step"] == 6)
  first, second = history
  for n in names:
    assert row6[f"train_signal/{n}/tokens"] > 0
    for key, who in (("student_ce", "student_loss"), ("teacher_ce", "teacher_loss")):
      want = 0.5 * row6[f"train_signal/{n}/{key}"] + 0.5 * first[who][n]
      assert second[who][n] == pytest.approx(want, rel=1e-12)
  # The weights follow the DDK formula from those losses.
  x = np.array([second["student_loss"][n] / second["teacher_loss"][n] for n in names])
  w1 = np.array([first["weights"][n] for n in names])
  psi = w1 * np.exp(x - x.max())
  np.testing.assert_allclose([second["weights"][n] for n in names], 0.5 * psi / psi.sum() + 0.5 / 3, rtol=1e-12)
  log = meta["log_state"]
  assert log["signal_start"] == 6 and len(log["signal_tokens"]) == 3 and None not in log["signal_student_ce"]
  assert summary["controller_eval_seconds"] < summary["eval_seconds"]  # only the teacher's, once


def test_train_signal_run_preempted_and_resumed_is_bit_identical(signal_env, monkeypatch):
  """SIGTERM after step 4 (inside the window of the update at 6, whose sums and running means
  the checkpoint of step 4 must carry), then the same call resumes."""
  workdir = os.path.join(signal_env["tmp"], "preempted")
  cfg = tiny_run.tiny_config(signal_env["assets"], **SIGNAL_RUN)
  real_jit = ts.jit_train_step

  def jit_then_signal(*args, **kwargs):
    step_fn = real_jit(*args, **kwargs)
    calls = []

    def wrapped(*a):
      out = step_fn(*a)
      calls.append(1)
      if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    return wrapped

  monkeypatch.setattr(ts, "jit_train_step", jit_then_signal)
  assert trainer.train(cfg, workdir) == {"status": "preempted", "step": 5}
  _, meta5 = tiny_run.read_checkpoint(workdir, 5)
  assert meta5["log_state"]["signal_start"] == 3 and sum(meta5["log_state"]["signal_tokens"]) > 0
  monkeypatch.setattr(ts, "jit_train_step", real_jit)
  assert trainer.train(cfg, workdir)["status"] == "done"
  ref = signal_env["ref"]
  assert tiny_run.comparable_metrics(workdir) == tiny_run.comparable_metrics(ref)
  state, meta = tiny_run.read_checkpoint(workdir, 8)
  ref_state, ref_meta = tiny_run.read_checkpoint(ref, 8)
  tiny_run.assert_same_state(state, ref_state)
  assert meta["controller"] == ref_meta["controller"]
  keys = [k for k in meta["log_state"] if k.startswith("signal_")]
  assert len(keys) == 6 and {k: meta["log_state"][k] for k in keys} == {k: ref_meta["log_state"][k] for k in keys}
