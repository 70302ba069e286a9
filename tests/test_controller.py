"""Tests for the DDK formulas (ddk_jax/ddk.py) and the mixture controller (ddk_jax/controller.py).

Expected values are written out by hand from the formulas in docs/ddk.md with numpy in
float64, independent of the implementation.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tiny_run
from ddk_jax.controller import MixtureController
from ddk_jax.ddk import MODES, apply_bounds, apply_floor
from ddk_jax.reporting import controller_table, format_domain_table
from ddk_jax.validation import reduce_domain_losses

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["web", "code", "wiki"]
LT = np.array([2.0, 1.0, 2.5])


def _ddk(mode="ddk", **kw):
  c = MixtureController(DOMAINS, mode, **kw)
  if mode != "cpt":
    c.set_teacher_losses(LT)
  return c


# ----------------------------------------------------------------------------
# hand-computed values
# ----------------------------------------------------------------------------


def test_first_and_second_ddk_update_match_hand_computation():
  c = _ddk(alpha=0.5)
  lS1 = np.array([3.0, 1.5, 3.0])
  # ratios 3/2, 1.5/1, 3/2.5 = 1.5, 1.5, 1.2
  e1 = np.array([np.exp(1.5), np.exp(1.5), np.exp(1.2)])
  softmax1 = e1 / (np.exp(1.5) + np.exp(1.5) + np.exp(1.2))
  # first update: r_prev uniform => alpha * softmax + (1 - alpha) / N
  want1 = 0.5 * softmax1 + 0.5 / 3
  got1 = c.update(0, lS1)
  np.testing.assert_allclose(got1, want1, rtol=0, atol=1e-15)
  # written-out decimals as a sanity anchor for the docs example
  np.testing.assert_allclose(got1, [0.3490939, 0.3490939, 0.3018121], atol=5e-7)

  lS2 = np.array([2.2, 1.5, 3.5])
  x2 = np.array([2.2 / 2.0, 1.5 / 1.0, 3.5 / 2.5])  # 1.1, 1.5, 1.4
  psi = want1 * np.exp(x2)
  want2 = 0.5 * psi / psi.sum() + 0.5 / 3
  got2 = c.update(1000, lS2)
  np.testing.assert_allclose(got2, want2, rtol=0, atol=1e-15)
  np.testing.assert_allclose(got2, [0.3033214, 0.3705316, 0.3261471], atol=5e-7)
  assert got2.dtype == np.float64
  assert c.history[1]["ratio"] == pytest.approx(dict(zip(DOMAINS, x2)), abs=1e-15)


def test_first_update_prior_is_uniform_not_initial_weights():
  # initial_weights only govern sampling before the first update; the first
  # update's smoothing prior is uniform (docs/ddk.md, "The first update").
  c = _ddk(initial_weights=[0.8, 0.1, 0.1])
  np.testing.assert_allclose(c.weights, [0.8, 0.1, 0.1])
  x = np.array([3.0, 1.5, 3.0]) / LT
  want = 0.5 * np.exp(x) / np.exp(x).sum() + 0.5 / 3  # uniform r_prev; 0.8/0.1/0.1 would differ
  np.testing.assert_allclose(c.update(0, [3.0, 1.5, 3.0]), want, rtol=0, atol=1e-15)


def test_no_smoothing_equals_raw_softmax_every_interval():
  c = _ddk("ddk_no_smoothing")
  # the docs' worked example
  np.testing.assert_allclose(c.update(0, [3.0, 1.5, 3.0]),
                             [0.3648546, 0.3648546, 0.2702909], atol=5e-7)
  np.testing.assert_allclose(c.update(1000, [2.2, 1.5, 3.5]),
                             [0.2603026, 0.3883258, 0.3513717], atol=5e-7)
  c = _ddk("ddk_no_smoothing")
  rng = np.random.default_rng(0)
  for k in range(5):
    lS = rng.uniform(0.5, 5.0, size=3)
    x = lS / LT
    want = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(c.update(k * 10, lS), want, rtol=0, atol=1e-15)


def test_equal_sampling_stays_uniform_but_records_losses():
  c = _ddk("ddk_equal_sampling")
  w = c.update(0, [5.0, 1.0, 2.0])
  np.testing.assert_array_equal(w, np.full(3, 1 / 3))
  h = c.history[-1]
  assert h["student_loss"] == {"web": 5.0, "code": 1.0, "wiki": 2.0}
  assert h["teacher_loss"] == {"web": 2.0, "code": 1.0, "wiki": 2.5}
  assert h["ratio"]["web"] == 2.5


@pytest.mark.parametrize("mode", ["cpt", "kd"])
def test_static_modes_keep_weights_and_history_is_json(mode):
  c = MixtureController(DOMAINS, mode, initial_weights={"web": 2, "code": 1, "wiki": 1})
  if mode == "kd":
    c.set_teacher_losses(LT)
  np.testing.assert_allclose(c.weights, [0.5, 0.25, 0.25])
  w = c.update(0, [3.0, 2.0, 1.0])
  np.testing.assert_allclose(w, [0.5, 0.25, 0.25])
  c.update(5, [2.0, 1.0, 0.5])
  text = json.dumps(c.state_dict(), allow_nan=False)  # no NaN/inf in JSON
  h = json.loads(text)["history"][0]
  if mode == "cpt":
    assert h["teacher_loss"] is None and h["ratio"] is None
  else:
    assert h["ratio"] == {"web": 1.5, "code": 2.0, "wiki": 0.4}


def test_modes():
  assert MODES == ("cpt", "kd", "ddk", "ddk_no_smoothing", "ddk_equal_sampling")
  # the static modes never move the weights, whatever the losses
  for mode in ("kd", "ddk_equal_sampling"):
    c = _ddk(mode)
    before = c.weights
    np.testing.assert_array_equal(c.update(0, [9.0, 0.1, 3.0]), before)


# ----------------------------------------------------------------------------
# properties over random inputs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddk", "ddk_no_smoothing"])
def test_weights_sum_to_one_and_smoothing_lower_bound(mode):
  rng = np.random.default_rng(1234)
  for trial in range(20):
    n = int(rng.integers(2, 10))
    alpha = float(rng.uniform(0.0, 1.0))
    names = [f"d{i}" for i in range(n)]
    c = MixtureController(names, mode, alpha=alpha)
    c.set_teacher_losses(rng.uniform(0.5, 4.0, size=n))
    for k in range(10):
      # include wild ratios (up to ~100) to exercise the max-shift
      w = c.update(k, rng.uniform(0.0, 60.0, size=n))
      assert np.all(np.isfinite(w))
      assert abs(w.sum() - 1.0) < 1e-12
      if mode == "ddk":
        assert np.all(w >= (1 - alpha) / n - 1e-15), (trial, k, w)


def test_equal_losses_keep_uniform_weights():
  rng = np.random.default_rng(7)
  lT = rng.uniform(0.5, 4.0, size=5)
  for mode in ("ddk", "ddk_no_smoothing"):
    c = MixtureController([f"d{i}" for i in range(5)], mode, alpha=0.5)
    c.set_teacher_losses(lT)
    for k in range(100):
      w = c.update(k, lT)
      np.testing.assert_allclose(w, np.full(5, 0.2), rtol=0, atol=1e-14)


def test_domain_whose_gap_grows_gains_weight():
  rng = np.random.default_rng(3)
  for _ in range(20):
    n = 4
    lT = rng.uniform(1.0, 3.0, size=n)
    lS = lT * rng.uniform(1.0, 1.5, size=n)
    c = MixtureController([f"d{i}" for i in range(n)], "ddk")
    c.set_teacher_losses(lT)
    before = c.update(0, lS)
    # domain j's gap grows, everything else unchanged
    j = int(rng.integers(n))
    lS2 = lS.copy()
    lS2[j] *= 1.3
    ref = MixtureController([f"d{i}" for i in range(n)], "ddk")
    ref.set_teacher_losses(lT)
    ref.update(0, lS)
    same = ref.update(1, lS)
    grown = c.update(1, lS2)
    assert grown[j] > same[j]
    # and relative to the previous update it is the domain that gained most
    assert np.argmax(grown / before) == j


def test_floor_respected_and_minimal():
  rng = np.random.default_rng(11)
  for _ in range(50):
    n = int(rng.integers(2, 8))
    floor = float(rng.uniform(0.0, 1.0 / n))
    c = MixtureController([f"d{i}" for i in range(n)], "ddk_no_smoothing", floor=floor)
    c.set_teacher_losses(np.ones(n))
    lS = rng.uniform(0.0, 30.0, size=n)
    w = c.update(0, lS)
    assert abs(w.sum() - 1) < 1e-12
    assert np.all(w >= floor - 1e-12)
    raw = np.exp(lS - lS.max()) / np.exp(lS - lS.max()).sum()
    free = w > floor + 1e-12
    # unclamped domains keep their relative proportions
    if free.sum() >= 2:
      ratios = w[free] / raw[free]
      np.testing.assert_allclose(ratios, ratios[0], rtol=1e-10)


def test_apply_floor_hand_example_and_per_domain_floor():
  # raw r = [0.9, 0.08, 0.02], floor 0.1: two domains clamped to 0.1, the
  # remaining 0.8 goes to the first.
  np.testing.assert_allclose(apply_floor([0.9, 0.08, 0.02], np.full(3, 0.1)),
                             [0.8, 0.1, 0.1], atol=1e-15)
  # already above the floor: unchanged
  np.testing.assert_array_equal(apply_floor([0.5, 0.3, 0.2], np.full(3, 0.1)),
                                [0.5, 0.3, 0.2])
  # per-domain floor as a mapping; floors summing to 1 pin the weights
  c = MixtureController(DOMAINS, "kd", floor={"web": 0.5, "code": 0.25, "wiki": 0.25})
  np.testing.assert_allclose(c.weights, [0.5, 0.25, 0.25])


def test_state_dict_json_round_trip_restores_identical_behaviour():
  rng = np.random.default_rng(5)
  a = _ddk(alpha=0.3, floor=0.05)
  for k in range(3):
    a.update(k * 100, rng.uniform(1.0, 6.0, size=3))
  state = json.loads(json.dumps(a.state_dict(), allow_nan=False))
  b = MixtureController(DOMAINS, "ddk", alpha=0.3, floor=0.05)
  b.load_state_dict(state)
  assert b.state_dict() == a.state_dict()
  np.testing.assert_array_equal(b.weights, a.weights)
  for k in range(3, 8):
    lS = rng.uniform(1.0, 6.0, size=3)
    np.testing.assert_array_equal(a.update(k * 100, lS), b.update(k * 100, lS))
  assert a.history == b.history
  # plain python types only
  s = a.state_dict()
  assert all(type(v) is float for v in s["weights"] + s["teacher_losses"])
  assert all(type(v) is float for h in s["history"] for v in h["weights"].values())


def test_load_state_dict_refuses_other_experiment():
  a = _ddk()
  a.update(0, [1.0, 1.0, 1.0])
  s = a.state_dict()
  with pytest.raises(ValueError, match="domains"):
    MixtureController(["web", "wiki", "code"], "ddk").load_state_dict(s)
  with pytest.raises(ValueError, match="mode 'ddk_no_smoothing'"):
    MixtureController(DOMAINS, "ddk_no_smoothing").load_state_dict(s)
  with pytest.raises(ValueError, match="alpha"):
    MixtureController(DOMAINS, "ddk", alpha=0.7).load_state_dict(s)


# ----------------------------------------------------------------------------
# variants: discrepancy, softmax temperature, floor and cap (docs/ddk.md, "Variants")
# ----------------------------------------------------------------------------


def test_excess_discrepancy_matches_hand_computation():
  c = _ddk(discrepancy="excess")
  x1 = np.array([3.0 - 2.0, 1.5 - 1.0, 3.0 - 2.5])  # lS - lT = 1.0, 0.5, 0.5
  e1 = np.exp(x1)
  want1 = 0.5 * e1 / e1.sum() + 0.5 / 3
  got1 = c.update(0, [3.0, 1.5, 3.0])
  np.testing.assert_allclose(got1, want1, rtol=0, atol=1e-15)
  np.testing.assert_allclose(got1, [0.392598, 0.303701, 0.303701], atol=5e-7)
  x2 = np.array([2.2 - 2.0, 1.5 - 1.0, 3.5 - 2.5])  # 0.2, 0.5, 1.0
  psi = want1 * np.exp(x2)
  want2 = 0.5 * psi / psi.sum() + 0.5 / 3
  got2 = c.update(1000, [2.2, 1.5, 3.5])
  np.testing.assert_allclose(got2, want2, rtol=0, atol=1e-15)
  np.testing.assert_allclose(got2, [0.2994402, 0.3053096, 0.3952502], atol=5e-7)
  # the ratio stays lS / lT in the history; the x used is recorded beside it
  h = c.history[1]
  assert h["ratio"] == pytest.approx({"web": 1.1, "code": 1.5, "wiki": 1.4}, abs=1e-15)
  assert h["discrepancy"] == pytest.approx(dict(zip(DOMAINS, x2)), abs=1e-15)
  assert "discrepancy" not in _ddk().state_dict()["history"]  # the paper's ratio: history as before
  # excess without smoothing: softmax(lS - lT)
  c = _ddk("ddk_no_smoothing", discrepancy="excess")
  np.testing.assert_allclose(c.update(0, [3.0, 1.5, 3.0]), e1 / e1.sum(), rtol=0, atol=1e-15)


def test_excess_and_ratio_rank_a_low_loss_domain_differently():
  # The same gap of 0.5 nats on an easy domain (lT = 1) and a hard one (lT = 4): the ratio
  # favours the easy domain (1.5 vs 1.125), the excess treats them alike.
  lt, ls = [1.0, 4.0], [1.5, 4.5]
  ratio = MixtureController(["easy", "hard"], "ddk_no_smoothing")
  ratio.set_teacher_losses(lt)
  excess = MixtureController(["easy", "hard"], "ddk_no_smoothing", discrepancy="excess")
  excess.set_teacher_losses(lt)
  w_ratio, w_excess = ratio.update(0, ls), excess.update(0, ls)
  assert w_ratio[0] > w_ratio[1]
  np.testing.assert_allclose(w_ratio, np.exp([1.5, 1.125]) / np.exp([1.5, 1.125]).sum(), rtol=0, atol=1e-15)
  np.testing.assert_array_equal(w_excess, [0.5, 0.5])


def test_softmax_temperature_matches_hand_computation():
  tau = 0.5
  x = np.array([3.0, 1.5, 3.0]) / LT  # 1.5, 1.5, 1.2
  e = np.exp(x / tau)
  c = _ddk("ddk_no_smoothing", softmax_temperature=tau)
  got = c.update(0, [3.0, 1.5, 3.0])
  np.testing.assert_allclose(got, e / e.sum(), rtol=0, atol=1e-15)
  np.testing.assert_allclose(got, [0.3923397, 0.3923397, 0.2153206], atol=5e-7)
  # smoothing: psi = r_prev * exp(x / tau)
  c = _ddk(softmax_temperature=2.0)
  w1 = c.update(0, [3.0, 1.5, 3.0])
  e1 = np.exp(x / 2.0)
  np.testing.assert_allclose(w1, 0.5 * e1 / e1.sum() + 0.5 / 3, rtol=0, atol=1e-15)
  x2 = np.array([1.1, 1.5, 1.4])
  psi = w1 * np.exp(x2 / 2.0)
  np.testing.assert_allclose(c.update(1000, [2.2, 1.5, 3.5]), 0.5 * psi / psi.sum() + 0.5 / 3, rtol=0, atol=1e-15)
  # a higher temperature flattens, a lower one sharpens
  flat, sharp = _ddk("ddk_no_smoothing", softmax_temperature=10.0), _ddk("ddk_no_smoothing", softmax_temperature=0.1)
  wf, ws = flat.update(0, [3.0, 1.5, 3.0]), sharp.update(0, [3.0, 1.5, 3.0])
  assert np.ptp(wf) < np.ptp(got) < np.ptp(ws)


def test_cap_matches_hand_computation():
  # the docs' step-0 weights [0.349094, 0.349094, 0.301812] with web capped at 0.3: web sits
  # at its cap and the freed mass goes to code and wiki in proportion
  c = _ddk(cap={"web": 0.3, "code": 1.0, "wiki": 1.0})
  x = np.array([1.5, 1.5, 1.2])
  r = 0.5 * np.exp(x) / np.exp(x).sum() + 0.5 / 3
  scale = (1 - 0.3) / (r[1] + r[2])
  got = c.update(0, [3.0, 1.5, 3.0])
  np.testing.assert_allclose(got, [0.3, r[1] * scale, r[2] * scale], rtol=0, atol=1e-15)
  np.testing.assert_allclose(got, [0.3, 0.375424, 0.324576], atol=5e-7)
  # the next update smooths against the capped weights that were sampled
  x2 = np.array([1.1, 1.5, 1.4])
  psi = got * np.exp(x2)
  r2 = 0.5 * psi / psi.sum() + 0.5 / 3
  assert r2[0] <= 0.3  # not capped this time: the raw update stands
  np.testing.assert_allclose(c.update(1000, [2.2, 1.5, 3.5]), r2, rtol=0, atol=1e-15)
  # the cap applies to the initial (static) weights too
  kd = MixtureController(DOMAINS, "kd", cap=0.5, initial_weights=[0.8, 0.1, 0.1])
  np.testing.assert_allclose(kd.weights, [0.5, 0.25, 0.25], atol=1e-15)


def test_apply_bounds_hand_examples():
  # web over its cap, wiki under its floor, code takes the rest
  np.testing.assert_allclose(apply_bounds([0.6, 0.3, 0.1], np.full(3, 0.15), np.full(3, 0.5)), [0.5, 0.35, 0.15],
                             atol=1e-15)
  # without a binding cap it is apply_floor exactly
  r = np.array([0.9, 0.08, 0.02])
  np.testing.assert_array_equal(apply_bounds(r, np.full(3, 0.1), np.ones(3)), apply_floor(r, np.full(3, 0.1)))
  np.testing.assert_array_equal(apply_bounds(r, np.full(3, 0.1), None), apply_floor(r, np.full(3, 0.1)))
  # zero-weight domains share what the caps of the others leave, in proportion to their room
  np.testing.assert_allclose(apply_bounds([1.0, 0.0, 0.0], np.zeros(3), np.array([0.5, 0.5, 0.25])),
                             [0.5, 1 / 3, 1 / 6], atol=1e-15)
  # floors and caps that meet pin the weights
  np.testing.assert_allclose(apply_bounds([0.2, 0.3, 0.5], np.array([0.5, 0.0, 0.0]), np.array([0.5, 1.0, 1.0])),
                             [0.5, 0.5 * 0.3 / 0.8, 0.5 * 0.5 / 0.8], atol=1e-15)


def test_apply_bounds_properties():
  rng = np.random.default_rng(17)
  for _ in range(300):
    n = int(rng.integers(2, 9))
    r = rng.dirichlet(np.full(n, 0.3))
    if rng.random() < 0.2:
      r[rng.integers(0, n)] = 0.0
      r /= r.sum()
    floor = rng.uniform(0, 1.0 / n, size=n) * rng.integers(0, 2, size=n)
    cap = np.minimum(1.0, floor + rng.uniform(0.0, 2.0 / n, size=n))
    if cap.sum() < 1:
      cap = np.minimum(1.0, cap + (1 - cap.sum()) / n + 1e-3)
    assert floor.sum() <= 1 <= cap.sum() and np.all(floor <= cap)
    out = apply_bounds(r, floor, cap)
    assert abs(out.sum() - 1) < 1e-12
    assert np.all(out >= floor - 1e-12) and np.all(out <= cap + 1e-12)
    # the domains strictly inside their bounds keep their proportions (one common scale)
    free = (out > floor + 1e-12) & (out < cap - 1e-12) & (r > 0)
    if free.sum() >= 2:
      scale = out[free] / r[free]
      np.testing.assert_allclose(scale, scale[0], rtol=1e-9)
      # ... and the bound domains are where the scaled weight would cross their bound
      at_cap, at_floor = (out >= cap - 1e-12) & (r > 0), (out <= floor + 1e-12) & (r > 0)
      assert np.all(scale[0] * r[at_cap & ~free] >= cap[at_cap & ~free] - 1e-9)
      assert np.all(scale[0] * r[at_floor & ~free] <= floor[at_floor & ~free] + 1e-9)
    # projecting again changes nothing; a feasible r is left alone
    np.testing.assert_allclose(apply_bounds(out, floor, cap), out, rtol=0, atol=1e-12)
    inside = np.clip(r, floor, cap)
    if abs(inside.sum() - 1) < 1e-15 and np.array_equal(inside, r):
      np.testing.assert_array_equal(apply_bounds(r, floor, cap), r)
    # order is kept between domains with the same bounds
    same = np.full(n, floor.max()), np.full(n, max(cap.min(), 1.0 / n))
    w = apply_bounds(r, *same)
    assert np.all(np.diff(w[np.argsort(r, kind="stable")]) >= -1e-12)


def test_floor_and_cap_feasibility_errors_name_the_domains():
  with pytest.raises(ValueError, match=r"the caps sum to 0\.6 < 1"):
    MixtureController(DOMAINS, "ddk", cap=0.2)
  with pytest.raises(ValueError, match=r"wiki \(floor 0\.3 > cap 0\.2\)"):
    MixtureController(DOMAINS, "ddk", floor={"web": 0, "code": 0, "wiki": 0.3},
                      cap={"web": 1, "code": 1, "wiki": 0.2})
  with pytest.raises(ValueError, match="cap for domain 'code'"):
    MixtureController(DOMAINS, "ddk", cap={"web": 1, "code": 1.5, "wiki": 1})
  with pytest.raises(ValueError, match="discrepancy"):
    MixtureController(DOMAINS, "ddk", discrepancy="difference")
  with pytest.raises(ValueError, match="softmax_temperature"):
    MixtureController(DOMAINS, "ddk", softmax_temperature=0.0)
  with pytest.raises(ValueError, match="signal"):
    MixtureController(DOMAINS, "ddk", signal="training")
  with pytest.raises(ValueError, match="signal_ema"):
    MixtureController(DOMAINS, "ddk", signal_ema=0.0)


VARIANT = {"discrepancy": "excess", "softmax_temperature": 0.5, "cap": 0.6, "floor": {"web": 0.1, "code": 0.0,
           "wiki": 0.1}, "signal": "train", "signal_ema": 0.5}


def test_state_dict_records_the_variant_and_refuses_another():
  a = _ddk(**VARIANT)
  a.update(0, [3.0, 1.5, 3.0], teacher_losses=[2.0, 1.2, 2.5])
  state = json.loads(json.dumps(a.state_dict(), allow_nan=False))
  assert (state["discrepancy"], state["softmax_temperature"], state["cap"], state["signal"], state["signal_ema"]) == (
      "excess", 0.5, [0.6] * 3, "train", 0.5)
  b = MixtureController(DOMAINS, "ddk", **VARIANT)
  b.load_state_dict(state)
  lS, lT = [2.2, 1.5, 3.5], [2.0, 1.1, 2.5]
  np.testing.assert_array_equal(a.update(10, lS, teacher_losses=lT), b.update(10, lS, teacher_losses=lT))
  for key, other in (("discrepancy", "ratio"), ("softmax_temperature", 1.0), ("cap", 1.0), ("signal", "validation"),
                     ("signal_ema", 1.0), ("floor", 0.1)):
    with pytest.raises(ValueError, match=key):
      MixtureController(DOMAINS, "ddk", **{**VARIANT, key: other}).load_state_dict(state)


def test_a_state_from_before_the_variants_loads_as_the_defaults():
  a = _ddk(alpha=0.3)
  a.update(0, [3.0, 1.5, 3.0])
  old = a.state_dict()
  for key in ("cap", "discrepancy", "softmax_temperature", "signal", "signal_ema"):
    del old[key]
  b = MixtureController(DOMAINS, "ddk", alpha=0.3)
  b.load_state_dict(old)
  assert b.state_dict() == a.state_dict()
  np.testing.assert_array_equal(a.update(5, [2.0, 1.0, 3.0]), b.update(5, [2.0, 1.0, 3.0]))
  for key, value in (("discrepancy", "excess"), ("softmax_temperature", 2.0), ("cap", 0.5), ("signal", "train")):
    with pytest.raises(ValueError, match=key):
      MixtureController(DOMAINS, "ddk", alpha=0.3, **{key: value}).load_state_dict(old)


# ----------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------


def test_bad_inputs_name_the_domain():
  c = MixtureController(DOMAINS, "ddk")
  with pytest.raises(ValueError, match="set_teacher_losses"):
    c.update(0, [1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="'code'.*> 0"):
    c.set_teacher_losses([1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="'wiki'.*non-finite"):
    c.set_teacher_losses([1.0, 1.0, float("nan")])
  with pytest.raises(ValueError, match="expected 3 values"):
    c.set_teacher_losses([1.0, 1.0])
  c.set_teacher_losses(LT)
  c.set_teacher_losses(LT.copy())  # identical: fine
  with pytest.raises(ValueError, match="force=True"):
    c.set_teacher_losses(LT + 1)
  c.set_teacher_losses(LT, force=True)
  with pytest.raises(ValueError, match="'web'.*non-finite"):
    c.update(0, [float("inf"), 1.0, 1.0])
  with pytest.raises(ValueError, match="'code'.*negative"):
    c.update(0, [1.0, -1.0, 1.0])
  with pytest.raises(ValueError, match=r"missing \['wiki'\]"):
    c.update(0, {"web": 1.0, "code": 1.0})
  c.update(0, [1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="steps must increase"):
    c.update(0, [1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="floor"):
    MixtureController(DOMAINS, "ddk", floor=0.4)
  with pytest.raises(ValueError, match="Unknown mode"):
    MixtureController(DOMAINS, "doremi")
  with pytest.raises(ValueError, match="alpha"):
    MixtureController(DOMAINS, "ddk", alpha=1.5)
  with pytest.raises(ValueError, match="no teacher"):
    MixtureController(DOMAINS, "cpt").set_teacher_losses(LT)
  with pytest.raises(ValueError, match="uniformly by definition"):
    MixtureController(DOMAINS, "ddk_equal_sampling", initial_weights=[1, 1, 1])
  with pytest.raises(ValueError, match="'code'"):
    MixtureController(DOMAINS, "kd", initial_weights=[1, -1, 1])


def test_reduce_domain_losses():
  np.testing.assert_array_equal(reduce_domain_losses([6.0, 3.0], [3, 2]), [2.0, 1.5])
  with pytest.raises(ValueError, match="'code'.*no target tokens"):
    reduce_domain_losses([1.0, 0.0], [4, 0], domains=["web", "code"])
  with pytest.raises(ValueError, match="#1"):
    reduce_domain_losses([1.0, 0.0], [4, 0])
  with pytest.raises(ValueError, match="equal"):
    reduce_domain_losses([1.0, 0.0], [4])


def test_format_table():
  c = _ddk()
  c.update(0, [3.0, 1.5, 3.0])
  t = controller_table(c)
  lines = t.splitlines()
  assert "lS/lT" in lines[0] and "weight" in lines[0]
  assert lines[2].split()[0] == "web"
  assert "1.5000" in lines[2] and "20.09" in lines[2]  # ratio, exp(3)
  cpt = format_domain_table(["a"], [1.0], None, [1.0])
  assert cpt.splitlines()[2].split() == ["a", "1.0000", "-", "-", "2.72", "-", "1.0000"]


# ----------------------------------------------------------------------------
# two processes: the eval step's global sums give identical weights on both hosts
# ----------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    pid, port, nproc = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if nproc > 1:
      jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    from ddk_jax import model, sharding, train_step as ts, validation
    from ddk_jax.controller import MixtureController
    cfg = model.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                            num_kv_heads=1, param_dtype="float32", compute_dtype="float32")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = sharding.DEFAULT_RULES
    psh = ts.params_shardings(cfg, mesh, rules)
    params = ts.init_params_sharded(cfg, jax.random.key(0), psh)
    eval_fn = ts.jit_eval_step(ts.make_eval_step(cfg, ts.StepOptions(num_domains=3, mode="cpt")), psh, mesh, rules)
    rng = np.random.default_rng(0)
    domains = ["web", "code", "wiki"]
    rows_per_host = 4 // nproc  # a global batch of 4 rows per domain, split over the hosts

    def batches(d):
      toks = rng.integers(1, 64, size=(4, 9)).astype(np.int32)
      seg = np.ones((4, 8), np.int32)
      seg[:, 6 - d:] = 0  # a different number of loss tokens per domain
      full = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg,
              "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)), "domain_id": np.full(4, d, np.int32)}
      mine = {k: v[pid * rows_per_host:(pid + 1) * rows_per_host] for k, v in full.items()}
      return lambda: [mine]

    val = {n: batches(d) for d, n in enumerate(domains)}
    losses, counts = validation.evaluate_domains(eval_fn, params, val, mesh, rules, domains)
    c = MixtureController(domains, "ddk", alpha=0.5)
    c.set_teacher_losses([3.0, 2.5, 4.0])
    w = c.update(0, losses)
    print("RESULT " + json.dumps({"weights": [float(v) for v in w], "losses": [float(v) for v in losses],
                                  "counts": counts.tolist()}), flush=True)
    if nproc > 1:
      jax.distributed.shutdown()
""")


def _run_workers(nproc: int) -> list[dict]:
  port = str(tiny_run.free_port())
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_NUM_CPU_DEVICES="1")
  env.pop("XLA_FLAGS", None)
  outs = tiny_run.run_local_processes(lambda i: [sys.executable, "-c", _WORKER, str(i), port, str(nproc)], nproc,
                                      env=env, timeout=180, what="the two-process evaluation")
  return [json.loads(tiny_run.result_line(out)) for out in outs]


def test_two_processes_compute_identical_weights_from_global_eval_sums():
  two = _run_workers(2)
  assert two[0] == two[1]  # bit-identical on both hosts
  one = _run_workers(1)[0]  # all rows on one host
  assert two[0]["counts"] == one["counts"] == [24.0, 20.0, 16.0]  # every token counted once
  np.testing.assert_allclose(two[0]["losses"], one["losses"], rtol=1e-6)
  np.testing.assert_allclose(two[0]["weights"], one["weights"], rtol=1e-6)
