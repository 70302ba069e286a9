"""Tests of preparation: shards, manifest, hold-out, idempotence, crashes."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ddk_jax.data import prepare as P
import data_helpers as testing
from ddk_jax.data import tokenizer as T
from ddk_jax.data.config import DataConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return testing.make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _corpus(tmp, tok_dir, **kw):
  tmp = str(tmp)
  testing.write_jsonl(f"{tmp}/a.jsonl", testing.make_texts(40, "a"))
  testing.write_jsonl(f"{tmp}/b1.jsonl", testing.make_texts(15, "b"))
  testing.write_jsonl(f"{tmp}/b2.jsonl", testing.make_texts(15, "bb") + [""])
  testing.write_jsonl(f"{tmp}/bval.jsonl", testing.make_texts(6, "bv"))
  domains = [{"name": "a", "train": [f"{tmp}/a.jsonl"]},
             {"name": "b", "train": [f"{tmp}/b*.jsonl"],
              "validation": [f"{tmp}/bval.jsonl"]}]
  # b*.jsonl also matches bval.jsonl: keep the train glob to b1/b2.
  domains[1]["train"] = [f"{tmp}/b1.jsonl", f"{tmp}/b2.jsonl"]
  kw.setdefault("docs_per_shard", 8)
  kw.setdefault("tokenize_batch_size", 3)
  return testing.data_config(tmp, domains, tok_dir, **kw)


def _read_shard_docs(path, dtype):
  from array_record.python import array_record_module
  r = array_record_module.ArrayRecordReader(path)
  docs = [np.frombuffer(b, dtype=dtype) for b in r.read_all()]
  r.close()
  return docs


def _all_docs(cfg, manifest, domain, split):
  out = []
  for sh in manifest["domains"][domain][split]["shards"]:
    out += _read_shard_docs(os.path.join(cfg.prepared_dir, sh["file"]),
                            manifest["dtype"])
  return out


def test_prepare_writes_shards_and_manifest(tmp_path, tok_dir):
  cfg = _corpus(tmp_path, tok_dir)
  m = P.prepare(cfg, progress=False, log=None)
  tok = T.load_tokenizer(tok_dir)
  assert m["tokenizer"]["hash"] == tok.hash and m["dtype"] == "uint16"
  a, b = m["domains"]["a"], m["domains"]["b"]
  # Hold-out: 5 of a's 40 documents; b has explicit validation files.
  assert (a["train"]["documents"], a["validation"]["documents"]) == (35, 5)
  assert (b["train"]["documents"], b["validation"]["documents"]) == (30, 6)
  assert b["train"]["skipped_empty"] == 1  # the empty document
  assert len(a["train"]["shards"]) == 5  # ceil(35 / 8)
  for split in ("train", "validation"):
    docs = _all_docs(cfg, m, "a", split)
    assert len(docs) == a[split]["documents"]
    assert sum(len(d) for d in docs) == a[split]["tokens"]
    assert a[split]["target_tokens"] == a[split]["tokens"] - len(docs)
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
  # Train and held-out validation are disjoint and cover the source.
  texts = lambda split: {tok.decode(d[1:-1]) for d in _all_docs(cfg, m, "a",
                                                                  split)}
  train, val = texts("train"), texts("validation")
  assert not train & val and train | val == set(testing.make_texts(40, "a"))
  # Manifest on disk equals the returned one.
  with open(os.path.join(cfg.prepared_dir, "manifest.json")) as f:
    assert json.load(f) == m


def test_holdout_is_deterministic_and_seeded(tmp_path, tok_dir):
  m1 = P.prepare(_corpus(tmp_path / "1", tok_dir), progress=False, log=None)
  m2 = P.prepare(_corpus(tmp_path / "2", tok_dir), progress=False, log=None)
  m3 = P.prepare(_corpus(tmp_path / "3", tok_dir, seed=7), progress=False,
                 log=None)
  val = lambda tmp, m: sorted(map(bytes, _all_docs(
      _corpus(tmp, tok_dir), m, "a", "validation")))
  assert val(tmp_path / "1", m1) == val(tmp_path / "2", m2)
  assert val(tmp_path / "1", m1) != val(tmp_path / "3", m3)


def test_rerun_is_a_noop(tmp_path, tok_dir):
  cfg = _corpus(tmp_path, tok_dir)
  m = P.prepare(cfg, progress=False, log=None)
  files = sorted(glob.glob(f"{cfg.prepared_dir}/**/*", recursive=True))
  mtimes = [os.path.getmtime(f) for f in files]
  assert P.prepare(cfg, progress=False, log=None) == m
  assert P.ensure_prepared(cfg) == m
  assert sorted(glob.glob(f"{cfg.prepared_dir}/**/*", recursive=True)) == files
  assert [os.path.getmtime(f) for f in files] == mtimes


def test_crash_mid_shard_leaves_nothing_marked_finished(tmp_path, tok_dir,
                                                        monkeypatch):
  # In this process (the patched tokenizer); worker processes: test_data_prepare_parallel.py.
  cfg = _corpus(tmp_path / "crash", tok_dir, num_prepare_workers=1)
  calls = {"n": 0, "crash_at": 7}
  real = T.TextTokenizer.encode_documents

  def flaky(self, texts, dtype=np.int32):
    calls["n"] += 1
    if calls["n"] == calls["crash_at"]:  # shard 2 of domain a, 2nd batch
      raise KeyboardInterrupt("simulated crash")
    return real(self, texts, dtype)

  monkeypatch.setattr(T.TextTokenizer, "encode_documents", flaky)
  with pytest.raises(KeyboardInterrupt):
    P.prepare(cfg, progress=False, log=None)
  train_dir = os.path.join(cfg.prepared_dir, "a", "train")
  assert not os.path.exists(os.path.join(cfg.prepared_dir, "manifest.json"))
  markers = sorted(os.listdir(train_dir))
  assert "shard-00000.json" in markers and "shard-00001.json" in markers
  assert "shard-00002.json" not in markers  # the crashed shard
  assert "shard-00002.array_record" not in markers  # only a temp file
  assert any(".tmp-" in f for f in markers)
  # Resume: finished shards are not re-tokenized; the result is identical to
  # a clean run.
  calls.update(n=0, crash_at=-1)
  resumed = P.prepare(cfg, progress=False, log=None)
  resumed_calls = calls["n"]
  assert not any(".tmp-" in f for f in os.listdir(train_dir))
  clean_cfg = _corpus(tmp_path / "clean", tok_dir, num_prepare_workers=1)
  calls["n"] = 0
  clean = P.prepare(clean_cfg, progress=False, log=None)
  # Shards 0 and 1 of "a" (3 tokenizer calls each) were not redone.
  assert resumed_calls == calls["n"] - 6
  for d in ("a", "b"):
    for split in ("train", "validation"):
      strip = lambda e: {k: v for k, v in e.items() if k != "sources"}
      assert strip(resumed["domains"][d][split]) == strip(
          clean["domains"][d][split])
      assert [bytes(x) for x in _all_docs(cfg, resumed, d, split)] == [
          bytes(x) for x in _all_docs(clean_cfg, clean, d, split)]


def test_torn_marker_shard_is_redone(tmp_path, tok_dir):
  cfg = _corpus(tmp_path, tok_dir)
  m = P.prepare(cfg, progress=False, log=None)
  marker = os.path.join(cfg.prepared_dir, "a", "train", "shard-00001.json")
  with open(marker, "w") as f:
    f.write('{"fingerpr')  # torn write
  os.remove(os.path.join(cfg.prepared_dir, "manifest.json"))
  assert P.prepare(cfg, progress=False, log=None) == m
  assert json.load(open(marker))["documents"] == 8


def test_manifest_refuses_other_tokenizer(tmp_path, tok_dir):
  cfg = _corpus(tmp_path, tok_dir)
  P.prepare(cfg, progress=False, log=None)
  assert P.load_manifest(cfg.prepared_dir, tok_dir, domains=["a", "b"])
  other = str(tmp_path / "other_tok")
  T.train_bpe_tokenizer(testing.make_texts(100, "q"), other, vocab_size=350)
  with pytest.raises(DataConfigError, match=r"prepared with another "
                     r"tokenizer.*rerun prepare"):
    P.load_manifest(cfg.prepared_dir, T.load_tokenizer(other))
  with pytest.raises(DataConfigError, match=r"domains \['c'\] are not in"):
    P.load_manifest(cfg.prepared_dir, domains=["a", "c"])
  with pytest.raises(DataConfigError, match=r"manifest.json is missing.*"
                     r"python -m ddk_jax.data.prepare"):
    P.load_manifest(str(tmp_path / "nothing"))
  # Re-preparing the same dir with another tokenizer is refused, too.
  cfg.tokenizer = other
  with pytest.raises(DataConfigError, match=r"domain 'a'.*prepared from "
                     r"different sources, tokenizer or settings"):
    P.prepare(cfg, progress=False, log=None)


def test_empty_domain_and_empty_validation(tmp_path, tok_dir):
  (tmp_path / "empty.jsonl").write_text("\n")
  (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
  testing.write_jsonl(str(tmp_path / "ok.jsonl"), testing.make_texts(10))
  cfg = testing.data_config(str(tmp_path), [
      {"name": "e", "train": [str(tmp_path / "empty.jsonl")]}], tok_dir)
  with pytest.raises(DataConfigError, match=r"domain 'e': the train sources "
                     r"contain no documents.*empty.jsonl"):
    P.prepare(cfg, progress=False, log=None)
  cfg = testing.data_config(str(tmp_path), [
      {"name": "v", "train": [str(tmp_path / "ok.jsonl")],
       "validation": [str(tmp_path / "blank.jsonl")]}], tok_dir)
  with pytest.raises(DataConfigError, match=r"domain 'v': the validation "
                     r"split has only empty documents \(2 skipped\).*"
                     r"blank.jsonl"):
    P.prepare(cfg, progress=False, log=None)
  cfg = testing.data_config(str(tmp_path), [
      {"name": "w", "train": [str(tmp_path / "ok.jsonl")],
       "num_validation_docs": 10}], tok_dir)
  with pytest.raises(DataConfigError, match=r"domain 'w': has 10 documents, "
                     r"not enough to hold out num_validation_docs=10"):
    P.prepare(cfg, progress=False, log=None)
  cfg = testing.data_config(str(tmp_path), [
      {"name": "x", "train": [str(tmp_path / "ok.jsonl")],
       "validation": [str(tmp_path / "ok.jsonl")]}], tok_dir)
  with pytest.raises(DataConfigError, match=r"both train and validation"):
    P.prepare(cfg, progress=False, log=None)


def test_changed_inputs_are_refused(tmp_path, tok_dir):
  cfg = _corpus(tmp_path, tok_dir)
  P.prepare(cfg, progress=False, log=None)
  testing.write_jsonl(str(tmp_path / "a.jsonl"), testing.make_texts(41, "a"))
  with pytest.raises(DataConfigError, match=r"domain 'a'.*prepared from "
                     r"different sources.*Delete"):
    P.prepare(cfg, progress=False, log=None)


def test_cli(tmp_path, tok_dir):
  cfg = _corpus(tmp_path, tok_dir)
  config_file = tmp_path / "cfg.py"
  config_file.write_text(textwrap.dedent(f"""
      import ml_collections

      def get_config():
        c = ml_collections.ConfigDict()
        c.data = ml_collections.ConfigDict({cfg.to_dict()!r})
        return c
  """))
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run(
      [sys.executable, "-m", "ddk_jax.data.prepare", f"--config={config_file}",
       "--config.data.docs_per_shard=16"],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "[prepare] done" in r.stdout
  m = P.load_manifest(cfg.prepared_dir, tok_dir)
  assert len(m["domains"]["a"]["train"]["shards"]) == 3  # ceil(35 / 16)
