"""Tests of the data config section and its validation."""

import math

import pytest

from ddk_jax.data import config as config_lib
from ddk_jax.data.config import DataConfigError


def _cfg(domains, **kw):
  cfg = config_lib.default_data_config()
  cfg.domains = domains
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_defaults_and_normalisation():
  cfg = _cfg([{"name": "web", "train": "a/*.jsonl"},
              {"name": "code", "train": ["b.jsonl"], "validation": ["c.jsonl"],
               "weight": 3, "text_field": "content"}])
  specs = config_lib.domain_specs(cfg)
  assert [s.name for s in specs] == ["web", "code"]
  assert specs[0].train == ("a/*.jsonl",)  # a single string becomes a list
  assert specs[0].holds_out_validation and specs[0].num_validation_docs == 500
  assert not specs[1].holds_out_validation
  assert specs[1].text_field == "content" and specs[1].weight == 3.0
  assert config_lib.initial_weights(cfg) == [0.25, 0.75]
  assert cfg.num_validation_docs == 500 and cfg.seq_len == 1024


def test_with_defaults_fills_missing_keys_and_rejects_typos():
  cfg = config_lib.with_defaults({"domains": [], "seq_len": 64})
  assert cfg.seq_len == 64 and cfg.num_validation_docs == 500
  with pytest.raises(DataConfigError, match=r"seq_lenn"):
    config_lib.with_defaults({"seq_lenn": 64})


def test_duplicate_domain_name():
  cfg = _cfg([{"name": "a", "train": "x"}, {"name": "a", "train": "y"}])
  with pytest.raises(DataConfigError,
                     match=r"duplicate domain name 'a'.*domains\[0\].*"
                     r"domains\[1\]"):
    config_lib.domain_specs(cfg)


@pytest.mark.parametrize("domain, pattern", [
    ({"name": "bad name", "train": "x"}, r"`name` must match"),
    ({"name": "a"}, r"'a'.*`train` lists no sources"),
    ({"name": "a", "train": "x", "txt_split": "para"}, r"'a'.*txt_split"),
    ({"name": "a", "train": "x", "colour": 1}, r"'a'.*unknown key.*colour"),
    ({"name": "a", "train": "x", "num_validation_docs": 0},
     r"'a'.*validation split would be empty"),
    ({"name": "a", "train": "x", "weight": -1}, r"'a' is -1.0.*>= 0"),
    ({"name": "a", "train": "x", "weight": math.nan}, r"'a' is nan.*finite"),
    ({"name": "a", "train": "x", "weight": 0}, r"all weights are zero"),
])
def test_bad_domain(domain, pattern):
  with pytest.raises(DataConfigError, match=pattern):
    config_lib.domain_specs(_cfg([domain]))


def test_empty_domains_and_bad_globals():
  with pytest.raises(DataConfigError, match="data.domains is empty"):
    config_lib.domain_specs(_cfg([]))
  ok = [{"name": "a", "train": "x"}]
  with pytest.raises(DataConfigError, match="data.seq_len"):
    config_lib.domain_specs(_cfg(ok, seq_len=1))
  with pytest.raises(DataConfigError, match="on_decode_error"):
    config_lib.domain_specs(_cfg(ok, on_decode_error="ignore"))


def test_check_weights():
  names = ["a", "b", "c"]
  assert config_lib.check_weights([1, 0, 2], names) == [1.0, 0.0, 2.0]
  with pytest.raises(ValueError, match=r"got 2 weights for 3 domains"):
    config_lib.check_weights([1, 2], names)
  with pytest.raises(ValueError, match=r"'b' is inf"):
    config_lib.check_weights([1, math.inf, 2], names)
  with pytest.raises(ValueError, match=r"all weights are zero"):
    config_lib.check_weights([0, 0, 0], names)
  with pytest.raises(ValueError, match=r"expected a list of 3 numbers"):
    config_lib.check_weights(["x", 1, 1], names)


def test_domain_seed_depends_on_name_not_position():
  s = config_lib.domain_seed(0, "code", "shuffle")
  assert s == config_lib.domain_seed(0, "code", "shuffle")
  assert s != config_lib.domain_seed(0, "web", "shuffle")
  assert s != config_lib.domain_seed(1, "code", "shuffle")
  assert 0 <= s < 2**32
