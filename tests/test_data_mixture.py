"""Tests of the dynamic mixture: exact resume, frequencies, weights, state."""

import json
import math

import grain
import numpy as np
import pytest

from ddk_jax.data import mixture as M


def _parents(n_domains=3, finite=None):
  """Domain d yields rows {"x": [d, k]} for k = 0, 1, ..., finite - 1."""
  out = []
  for d in range(n_domains):
    ds = grain.MapDataset.range(finite or 10**6).map(
        lambda k, d=d: {"x": np.array([d, k], np.int32)})
    out.append(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
  return out


def _mixture(weights=(1.0, 1.0, 1.0), seed=3, process_index=0, **kw):
  return M.DynamicMixtureIterDataset(
      _parents(len(weights), **kw), list(weights), seed=seed,
      process_index=process_index, names=[f"d{i}" for i in range(len(weights))])


def _rows(it, n):
  return [tuple(next(it)["x"].tolist()) for _ in range(n)]


def _assert_plain_json(x):
  if isinstance(x, dict):
    assert all(isinstance(k, str) for k in x)
    for v in x.values():
      _assert_plain_json(v)
  elif isinstance(x, list):
    for v in x:
      _assert_plain_json(v)
  else:
    assert x is None or type(x) in (int, float, str, bool), type(x)


@pytest.mark.parametrize("n, m", [(0, 30), (37, 50)])
def test_exact_resume_with_weight_changes(n, m):
  it = iter(_mixture())
  _rows(it, n // 2)
  it.set_weights([5.0, 1.0, 0.5])  # changed before the save
  _rows(it, n - n // 2)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would
  _assert_plain_json(state)
  assert state["counter"] == n and state["weights"] == [5.0, 1.0, 0.5]
  after = [0.1, 1.0, 3.0]
  it.set_weights(after)  # changed after the save
  expected = _rows(it, m)
  restored = iter(_mixture())  # a fresh pipeline
  restored.set_state(state)
  restored.set_weights(after)
  assert _rows(restored, m) == expected
  # Within each domain rows come in order: nothing skipped or repeated.
  for d in range(3):
    ks = [k for dd, k in expected if dd == d]
    assert ks == list(range(ks[0], ks[0] + len(ks))), (d, ks)


def test_restore_without_weight_change_uses_saved_weights():
  it = iter(_mixture())
  it.set_weights([0.0, 1.0, 2.0])
  _rows(it, 10)
  state = it.get_state()
  expected = _rows(it, 40)
  restored = iter(_mixture())
  restored.set_state(state)
  assert restored.weights == [0.0, 1.0, 2.0]
  assert _rows(restored, 40) == expected


def test_grain_checkpoint_helper_on_finite_mixture():
  ds = _mixture(weights=(1.0, 2.0), finite=20)
  grain.experimental.assert_equal_output_after_checkpoint(ds)


def test_empirical_frequencies_match_weights():
  weights = [0.5, 0.3, 0.15, 0.05]
  it = iter(_mixture(weights=weights, seed=0))
  n = 20_000
  domains = [d for d, _ in _rows(it, n)]
  counts = np.bincount(domains, minlength=4)
  expected = np.array(weights) * n
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  assert chi2 < 16.27, (counts, chi2)  # chi-square, 3 dof, p = 0.001
  np.testing.assert_allclose(counts / n, weights, atol=0.01)


def test_zero_weight_domain_is_never_drawn():
  it = iter(_mixture(weights=(1.0, 0.0, 1.0)))
  rows = _rows(it, 500)
  assert {d for d, _ in rows} == {0, 2}
  assert it.get_state()["parents"][1] == {"next_index": 0}


@pytest.mark.parametrize("weights, pattern", [
    ([1.0, 1.0], r"got 2 weights for 3 domains \['d0', 'd1', 'd2'\]"),
    ([1.0, math.nan, 1.0], r"weight of domain 'd1' is nan"),
    ([1.0, -0.5, 1.0], r"weight of domain 'd1' is -0.5"),
    ([0.0, 0.0, 0.0], r"all weights are zero"),
    (np.array([1.0, np.inf, 1.0], np.float32), r"'d1' is inf"),
])
def test_bad_weights(weights, pattern):
  it = iter(_mixture())
  with pytest.raises(ValueError, match=pattern):
    it.set_weights(weights)
  with pytest.raises(ValueError, match=pattern):
    M.DynamicMixtureIterDataset(_parents(3), weights,
                                names=["d0", "d1", "d2"])
  it.set_weights(np.array([1, 2, 3], np.float32))  # numpy input is fine
  _assert_plain_json(it.get_state())


def test_counter_uniform_is_deterministic_and_keyed():
  u = [M.counter_uniform(1, 0, c) for c in range(1000)]
  assert u == [M.counter_uniform(1, 0, c) for c in range(1000)]
  assert all(0.0 <= x < 1.0 for x in u)
  assert abs(np.mean(u) - 0.5) < 0.03
  assert u != [M.counter_uniform(1, 1, c) for c in range(1000)]
  assert u != [M.counter_uniform(2, 0, c) for c in range(1000)]


def test_processes_draw_different_domain_sequences():
  a = [d for d, _ in _rows(iter(_mixture(process_index=0)), 50)]
  b = [d for d, _ in _rows(iter(_mixture(process_index=1)), 50)]
  assert a != b


def test_set_state_mismatches_are_clear():
  state = iter(_mixture()).get_state()
  with pytest.raises(ValueError, match=r"saved by process 0 but is restored "
                     r"in process 1"):
    iter(_mixture(process_index=1)).set_state(state)
  with pytest.raises(ValueError, match=r"data.seed=3"):
    iter(_mixture(seed=4)).set_state(state)
  two = M.DynamicMixtureIterDataset(_parents(2), [1, 1], seed=3,
                                    names=["d0", "d1"])
  with pytest.raises(ValueError, match=r"state is for domains \['d0', 'd1', "
                     r"'d2'\] but this pipeline has \['d0', 'd1'\]"):
    iter(two).set_state(state)


def test_finite_parent_stops_and_next_batch():
  it = iter(_mixture(weights=(1.0,), finite=50))
  batch = it.next_batch(8)
  assert batch["x"].shape == (8, 2)
  assert len(list(it)) == 42


def test_stack_rows():
  rows = [{"a": np.zeros(3, np.int32), "d": np.asarray(1, np.int32)}] * 2
  b = M.stack_rows(rows)
  assert b["a"].shape == (2, 3) and b["d"].shape == (2,)


def test_orbax_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  it = iter(_mixture())
  _rows(it, 10)
  it.set_weights([3.0, 1.0, 0.0])
  mgr = ocp.CheckpointManager(
      str(tmp_path), options=ocp.CheckpointManagerOptions(create=True))
  mgr.save(1, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  expected = _rows(it, 20)
  restored = iter(_mixture())
  mgr.restore(1, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(restored)))
  assert restored.weights == [3.0, 1.0, 0.0]
  assert _rows(restored, 20) == expected
  mgr.close()
