"""Tests of the demo corpus: contents, determinism, caching, end to end use."""

import filecmp
import json
import os
import zlib

import pytest

from ddk_jax.demo import corpus as D
from ddk_jax.data import pipeline as PL
from ddk_jax.data import prepare as P
from ddk_jax.data.config import domain_specs
from ddk_jax.data.tokenizer import load_tokenizer

SMALL = dict(scale=0.05, vocab_size=1024)  # small and fast for tests


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo") / "corpus")
  return out, D.ensure_demo_corpus(out, **SMALL)


def _texts(out, domain, split="train"):
  with open(os.path.join(out, domain, f"{split}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f]


def test_domains_splits_and_tokenizer(demo):
  out, info = demo
  assert set(info["domains"]) == set(D.DOMAINS) and len(D.DOMAINS) >= 5
  for name in D.DOMAINS:
    train, val = _texts(out, name), _texts(out, name, "validation")
    assert len(train) == info["domains"][name]["train_documents"] > 0
    assert len(val) == info["domains"][name]["validation_documents"] >= 10
    assert not set(train) & set(val)
  tok = load_tokenizer(info["tokenizer"])
  assert (tok.bos_id, tok.eos_id) == (0, 1)
  assert tok.backend.token_to_id("<|pad|>") == 2
  assert "def " in "".join(_texts(out, "code"))
  assert "Solve" in "".join(_texts(out, "math"))


def test_domains_differ_in_difficulty(demo):
  # zlib's compression ratio is a cheap proxy for how predictable text is.
  out, _ = demo
  ratio = {}
  for name in D.DOMAINS:
    raw = "".join(_texts(out, name)).encode()
    ratio[name] = len(zlib.compress(raw, 9)) / len(raw)
  assert max(ratio["records"], ratio["math"]) < ratio["code"] < min(
      ratio["docstrings"], ratio["prose"]), ratio


def test_cached_and_deterministic(demo, tmp_path):
  out, info = demo
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs)
  mtimes = [os.path.getmtime(f) for f in files]
  again = D.ensure_demo_corpus(out, **SMALL)  # a no-op
  assert again["domains"] == info["domains"]
  assert [os.path.getmtime(f) for f in files] == mtimes
  other = str(tmp_path / "other")
  D.main(["--out", other, "--scale", "0.05", "--vocab_size", "1024"])
  rel = [os.path.relpath(f, out) for f in files if not f.endswith("DONE")]
  match, mismatch, errors = filecmp.cmpfiles(out, other, rel, shallow=False)
  assert not mismatch and not errors and len(match) == len(rel)


def test_refuses_other_settings_and_foreign_dirs(demo, tmp_path):
  out, _ = demo
  with pytest.raises(ValueError, match=r"built with .*delete it"):
    D.ensure_demo_corpus(out, scale=0.05, vocab_size=1024, seed=1)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match=r"not empty and is not a finished "
                     r"demo corpus"):
    D.ensure_demo_corpus(str(tmp_path / "mine"), **SMALL)


def test_demo_config_end_to_end(demo, tmp_path):
  out, _ = demo
  cfg = D.demo_data_config(out, prepared_dir=str(tmp_path / "prep"),
                           seq_len=64)
  assert [s.name for s in domain_specs(cfg)] == list(D.DOMAINS)
  manifest = P.prepare(cfg, progress=False, log=None)
  assert set(manifest["domains"]) == set(D.DOMAINS)
  it = PL.build_train_iterator(cfg, process_index=0, process_count=1)
  batch = it.next_batch(16)
  assert batch["inputs"].shape == (16, 64)
  val = PL.build_validation(cfg, batch_size=4, process_index=0,
                            process_count=1)
  assert list(val) == list(D.DOMAINS)
  assert all(v.num_batches >= 1 for v in val.values())
