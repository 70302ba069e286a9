"""Tests of per-domain pipelines, the train mixture and validation batches."""

import collections
import json
import os
import socket
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest

from ddk_jax.data import pipeline as PL
from ddk_jax.data import prepare as P
import data_helpers as testing
from ddk_jax.data import tokenizer as T
from ddk_jax.data.config import DataConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("corpus"))
  tok_dir = testing.make_tokenizer(os.path.join(tmp, "tok"))
  # "long" documents are 3-8x seq_len: they must be split, never dropped.
  testing.write_jsonl(f"{tmp}/short.jsonl", testing.make_texts(60, "short"))
  testing.write_jsonl(f"{tmp}/long.jsonl", testing.make_texts(
      25, "long", min_words=60, max_words=150))
  testing.write_jsonl(f"{tmp}/long_val.jsonl", testing.make_texts(
      7, "lval", min_words=40, max_words=100))
  cfg = testing.data_config(tmp, [
      {"name": "short", "train": [f"{tmp}/short.jsonl"], "weight": 1.0},
      {"name": "long", "train": [f"{tmp}/long.jsonl"],
       "validation": [f"{tmp}/long_val.jsonl"], "weight": 3.0},
  ], tok_dir, seq_len=SEQ, docs_per_shard=16)
  manifest = P.prepare(cfg, progress=False, log=None)
  return cfg, manifest, T.load_tokenizer(tok_dir)


def _prepared_docs(cfg, manifest, domain, split="train"):
  ds = PL.domain_documents(cfg.prepared_dir, manifest, domain, split)
  return [tuple(d[1:-1].tolist()) for d in ds]  # without BOS/EOS


def _one_pass_rows(cfg, manifest, domain, **kw):
  kw.setdefault("shuffle", False)
  return list(PL.domain_rows(cfg.prepared_dir, manifest, domain, domain_id=0,
                             seq_len=SEQ, num_epochs=1, **kw))


def _eq_rows(a, b):
  return len(a) == len(b) and all(
      all(np.array_equal(x[k], y[k]) for k in PL.ROW_KEYS)
      for x, y in zip(a, b))


def test_rows_follow_the_batch_contract(corpus):
  cfg, manifest, tok = corpus
  it = PL.build_train_iterator(cfg, process_index=0, process_count=1)
  for _ in range(40):
    r = next(it)
    assert set(r) == set(PL.ROW_KEYS)
    for k in ("inputs", "targets", "segment_ids", "positions"):
      assert r[k].shape == (SEQ,) and r[k].dtype == np.int32
    assert r["domain_id"].shape == () and r["domain_id"].dtype == np.int32
    seg, pos = r["segment_ids"], r["positions"]
    assert (seg > 0).all()  # infinite train rows are full: no padding
    for s in np.unique(seg):
      idx = np.nonzero(seg == s)[0]
      assert (np.diff(idx) == 1).all()  # contiguous
      assert pos[idx].tolist() == list(range(len(idx)))  # restart at 0
      # Inside a segment the target is the next input: no target crosses a
      # document boundary.
      assert (r["targets"][idx[:-1]] == r["inputs"][idx[1:]]).all()
    # BOS only ever starts a segment; EOS is only a target.
    assert not (r["inputs"] == tok.eos_id).any()
    bos_at = np.nonzero(r["inputs"] == tok.bos_id)[0]
    assert all(pos[i] == 0 for i in bos_at)


def test_long_documents_are_split_never_dropped(corpus):
  cfg, manifest, tok = corpus
  docs = _prepared_docs(cfg, manifest, "long")
  assert max(len(d) for d in docs) > 3 * SEQ
  rows = _one_pass_rows(cfg, manifest, "long")
  assert testing.documents_from_rows(rows, tok.bos_id) == docs
  n_targets = sum(int((r["segment_ids"] > 0).sum()) for r in rows)
  assert n_targets == manifest["domains"]["long"]["train"]["target_tokens"]
  # Concat-then-split: only the last row of a finite pass has padding.
  assert all((r["segment_ids"] > 0).all() for r in rows[:-1])


def test_shuffle_is_seeded_and_reshuffles_every_epoch(corpus):
  cfg, manifest, tok = corpus
  docs = _prepared_docs(cfg, manifest, "short")
  shuffled = testing.documents_from_rows(
      _one_pass_rows(cfg, manifest, "short", shuffle=True, seed=1), tok.bos_id)
  assert sorted(shuffled) == sorted(docs) and shuffled != docs
  again = testing.documents_from_rows(
      _one_pass_rows(cfg, manifest, "short", shuffle=True, seed=1), tok.bos_id)
  assert again == shuffled
  two = testing.documents_from_rows(list(PL.domain_rows(
      cfg.prepared_dir, manifest, "short", domain_id=0, seq_len=SEQ,
      shuffle=True, seed=1, num_epochs=2)), tok.bos_id)
  assert two[:len(docs)] == shuffled
  assert sorted(two[len(docs):]) == sorted(docs) and two[len(docs):] != (
      shuffled)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_train_mixture_exact_resume(corpus, num_threads):
  cfg, manifest, _ = corpus
  cfg = cfg.copy_and_resolve_references()
  cfg.num_threads = num_threads
  build = lambda: PL.build_train_iterator(cfg, process_index=0,
                                          process_count=1, manifest=manifest)
  it = build()
  for _ in range(23):
    next(it)
  it.set_weights([1.0, 0.2])
  for _ in range(14):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  it.set_weights([0.3, 0.7])
  expected = [next(it) for _ in range(45)]
  restored = build()
  restored.set_state(state)
  restored.set_weights([0.3, 0.7])
  assert _eq_rows([next(restored) for _ in range(45)], expected)


def test_grain_checkpoint_helper_on_packed_domain(corpus):
  cfg, manifest, _ = corpus
  ds = PL.domain_rows(cfg.prepared_dir, manifest, "long", domain_id=1,
                      seq_len=SEQ, shuffle=True, num_epochs=1)
  grain.experimental.assert_equal_output_after_checkpoint(
      grain.experimental.LimitIterDataset(ds, count=12))


def test_domain_ids_match_row_content(corpus):
  cfg, manifest, tok = corpus
  it = PL.build_train_iterator(cfg, process_index=0, process_count=1)
  rows = [next(it) for _ in range(200)]
  counts = collections.Counter(int(r["domain_id"]) for r in rows)
  assert counts[1] > counts[0] > 20  # weights 1 : 3
  for r in rows[:30]:
    text = tok.decode(r["inputs"])
    name = ["short", "long"][int(r["domain_id"])]
    other = ["short", "long"][1 - int(r["domain_id"])]
    assert f"{other} " not in text.replace("<|bos|>", " ")
    for doc_start in text.split("<|bos|>")[1:]:  # text after each BOS
      assert (doc_start + " ").startswith(f"{name} ") or name.startswith(
          doc_start), text


def test_simulated_processes_get_disjoint_covering_documents(corpus):
  cfg, manifest, tok = corpus
  for domain in ("short", "long"):
    single = testing.documents_from_rows(
        _one_pass_rows(cfg, manifest, domain, shuffle=True), tok.bos_id)
    parts = [testing.documents_from_rows(_one_pass_rows(
        cfg, manifest, domain, shuffle=True, process_index=p,
        process_count=2), tok.bos_id) for p in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(single)


def test_validation_batches(corpus):
  cfg, manifest, tok = corpus
  per_process = [PL.build_validation(cfg, batch_size=2, process_index=p,
                                     process_count=2) for p in range(2)]
  for name, domain_id in (("short", 0), ("long", 1)):
    entry = manifest["domains"][name]["validation"]
    vb = [v[name] for v in per_process]
    assert vb[0].num_batches == vb[1].num_batches  # collectives line up
    total = 0
    for v in vb:
      batches = list(v())
      assert len(batches) == v.num_batches and batches
      assert _eq_rows(  # deterministic: a second pass is identical
          [dict((k, b[k][i]) for k in b) for b in batches for i in range(2)],
          [dict((k, b[k][i]) for k in b) for b in v() for i in range(2)])
      for b in batches:
        assert b["inputs"].shape == (2, SEQ) and b["domain_id"].tolist() == [
            domain_id] * 2
      n = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
      assert n == v.num_target_tokens
      total += n
      # Padding rows are all zero.
      flat = [dict((k, b[k][i]) for k in b) for b in batches for i in range(2)]
      pad = flat[len(v.rows):]
      assert all(not r[k].any() for r in pad for k in ("inputs", "targets",
                                                        "segment_ids",
                                                        "positions"))
    assert total == entry["target_tokens"] == vb[0].global_num_target_tokens
    docs = [testing.documents_from_rows(v.rows, tok.bos_id) for v in vb]
    assert sorted(docs[0] + docs[1]) == sorted(
        _prepared_docs(cfg, manifest, name, "validation"))


def test_validation_row_cap(corpus):
  cfg, manifest, tok = corpus
  full = [PL.build_validation(cfg, batch_size=2, process_index=p, process_count=2)
          for p in range(2)]
  for cap in (1, 2, 3, 5, 10_000):
    capped = [PL.build_validation(cfg, batch_size=2, process_index=p,
                                  process_count=2, max_rows=cap)
              for p in range(2)]
    for name in ("short", "long"):
      f, c = [v[name] for v in full], [v[name] for v in capped]
      available = len(f[0].rows) + len(f[1].rows)
      assert len(c[0].rows) + len(c[1].rows) == min(cap, available)
      assert abs(len(c[0].rows) - len(c[1].rows)) <= 1 or cap >= available
      assert c[0].num_batches == c[1].num_batches  # collectives line up
      for vf, vc in zip(f, c):
        assert _eq_rows(vc.rows, vf.rows[:len(vc.rows)])  # a fixed prefix
        n = sum(int((b["segment_ids"] > 0).sum()) for b in vc())
        assert n == vc.num_target_tokens
      assert c[0].global_num_target_tokens == sum(v.num_target_tokens for v in c)
  with pytest.raises(ValueError, match=r"max_rows must be >= 0"):
    PL.build_validation(cfg, batch_size=2, max_rows=-1)


def test_split_row_cap():
  assert PL._split_row_cap([5, 5], 4) == [2, 2]
  assert PL._split_row_cap([5, 5], 3) == [2, 1]
  assert PL._split_row_cap([1, 9], 6) == [1, 5]
  assert PL._split_row_cap([2, 3], 100) == [2, 3]
  assert PL._split_row_cap([0, 4, 4], 5) == [0, 3, 2]


def test_pipeline_errors(corpus, tmp_path):
  cfg, manifest, tok = corpus
  bad = cfg.copy_and_resolve_references()
  bad.prepared_dir = str(tmp_path / "none")
  with pytest.raises(DataConfigError, match=r"manifest.json is missing"):
    PL.build_train_dataset(bad, process_index=0, process_count=1)
  with pytest.raises(DataConfigError, match=r"domain 'long' \(validation\) "
                     r"has 7 documents, fewer than the 8 processes"):
    PL.domain_rows(cfg.prepared_dir, manifest, "long", domain_id=1,
                   split="validation", seq_len=SEQ, process_index=7,
                   process_count=8)
  with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
    PL.build_train_dataset(cfg, process_index=2, process_count=2)
  with pytest.raises(ValueError, match=r"got 1 weights for 2 domains"):
    PL.build_train_dataset(cfg, process_index=0, process_count=1,
                           weights=[1.0])


_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    pid, port, cfg_json, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=2, process_id=pid)
    import data_helpers as testing
    from ddk_jax.data import pipeline
    from ddk_jax.data.config import with_defaults
    from ddk_jax.data.tokenizer import load_tokenizer_from_config
    cfg = with_defaults(json.loads(cfg_json))
    bos = load_tokenizer_from_config(cfg).bos_id
    # Process index and count come from jax.distributed.
    rows = list(pipeline.build_train_iterator(cfg, num_epochs=1))
    val = pipeline.build_validation(cfg, batch_size=2)["long"]
    with open(out, "w") as f:
      json.dump({"process": [jax.process_index(), jax.process_count()],
                 "docs": testing.documents_from_rows(rows, bos),
                 "val_batches": val.num_batches,
                 "val_docs": testing.documents_from_rows(val.rows, bos)}, f)
    jax.distributed.shutdown()
""")


def test_two_jax_processes_get_disjoint_rows_covering_one_process(
    corpus, tmp_path):
  cfg, manifest, tok = corpus
  one = cfg.copy_and_resolve_references()
  one.domains = [d for d in one.domains if d["name"] == "long"]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.dirname(os.path.abspath(__file__))]),
             JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, str(script), str(i), str(port),
       json.dumps(one.to_dict()), str(tmp_path / f"out{i}.json")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=180)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  outs = [json.loads((tmp_path / f"out{i}.json").read_text())
          for i in range(2)]
  assert [o["process"] for o in outs] == [[0, 2], [1, 2]]
  parts = [[tuple(d) for d in o["docs"]] for o in outs]
  assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
  single = testing.documents_from_rows(list(PL.build_train_iterator(
      one, process_index=0, process_count=1, num_epochs=1)), tok.bos_id)
  assert sorted(parts[0] + parts[1]) == sorted(single)
  assert outs[0]["val_batches"] == outs[1]["val_batches"]
  val = [tuple(d) for o in outs for d in o["val_docs"]]
  assert sorted(val) == sorted(_prepared_docs(one, manifest, "long",
                                              "validation"))
