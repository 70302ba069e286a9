"""Tests of raw document sources: formats, globs, hold-out order, bad input."""

import gzip
import json

import numpy as np
import pytest

from ddk_jax.data import sources as S
from ddk_jax.data.config import DataConfigError, DomainSpec


def _spec(train, validation=(), **kw):
  kw.setdefault("text_field", "text")
  kw.setdefault("txt_split", "file")
  kw.setdefault("array_record_format", "text")
  return DomainSpec(name="dom", domain_id=0, train=tuple(train),
                    validation=tuple(validation), weight=1.0,
                    num_validation_docs=2, **kw)


def _docs(spec, split="train", **opts):
  o = S.ReadOptions(domain=spec.name, split=split, text_field=spec.text_field,
                    txt_split=spec.txt_split,
                    array_record_format=spec.array_record_format, **opts)
  srcs = S.resolve_sources(spec, split)
  counts = [S.count_documents(s, o) for s in srcs]
  docs = list(S.iter_split_documents(srcs, o))
  assert sum(counts) == len(docs)  # count_documents agrees with iteration
  return docs


def test_jsonl_and_gz_glob_order(tmp_path):
  (tmp_path / "b.jsonl").write_text('{"text": "b1"}\n\n{"text": "b2"}\n')
  with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
    f.write('{"text": "a1", "x": 1}\n')
  spec = _spec([str(tmp_path / "*.jsonl*"), str(tmp_path / "b.jsonl")])
  # Sorted glob matches, blank lines ignored, duplicates dropped.
  assert _docs(spec) == ["a1", "b1", "b2"]


def test_custom_text_field_and_missing_field(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text('{"content": "hello"}\n{"body": "x"}\n')
  with pytest.raises(DataConfigError,
                     match=r"domain 'dom'.*d.jsonl \(line 2\).*no field "
                     r"'content'.*\['body'\]"):
    _docs(_spec([str(p)], text_field="content"))


def test_invalid_json_names_line(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(DataConfigError, match=r"d.jsonl \(line 2\): invalid JSON"):
    _docs(_spec([str(p)]))


def test_txt_file_and_blank_line_modes(tmp_path):
  (tmp_path / "one.txt").write_text("para one\nline two\n\n\npara two\n")
  (tmp_path / "two.txt").write_text("other\n")
  glob = str(tmp_path / "*.txt")
  assert _docs(_spec([glob])) == ["para one\nline two\n\n\npara two\n",
                                  "other\n"]
  assert _docs(_spec([glob], txt_split="blank_line")) == [
      "para one\nline two", "para two", "other"]


def test_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  p = str(tmp_path / "d.parquet")
  pq.write_table(pa.table({"text": ["x", None, "z"], "n": [1, 2, 3]}), p)
  assert _docs(_spec([p])) == ["x", "", "z"]  # null -> empty (skipped later)
  with pytest.raises(DataConfigError, match=r"no column 'body'.*\['text', 'n'\]"):
    _docs(_spec([p], text_field="body"))


def test_array_record_text_and_json(tmp_path):
  from array_record.python import array_record_module
  p = str(tmp_path / "d.array_record")
  w = array_record_module.ArrayRecordWriter(p, "group_size:1")
  for t in ["first", "second"]:
    w.write(t.encode())
  w.close()
  assert _docs(_spec([p])) == ["first", "second"]
  q = str(tmp_path / "j.array_record-00000-of-00001")  # TFDS-style name
  w = array_record_module.ArrayRecordWriter(q, "group_size:1")
  w.write(json.dumps({"body": "json doc"}).encode())
  w.close()
  assert _docs(_spec([q], text_field="body", array_record_format="json")) == [
      "json doc"]


def test_tfds_source(monkeypatch):
  import tensorflow_datasets as tfds
  calls = []

  def fake_data_source(name, split, data_dir=None):
    calls.append((name, split, data_dir))
    return [{"text": np.bytes_(b"t0")}, {"text": b"t1"}]

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  spec = _spec(["tfds:my_ds/cfg:1.0.0"], ["tfds:my_ds/cfg:1.0.0@test[:10]"])
  assert _docs(spec, tfds_data_dir="/d") == ["t0", "t1"]
  assert _docs(spec, "validation") == ["t0", "t1"]
  assert calls[0] == ("my_ds/cfg:1.0.0", "train", "/d")
  assert calls[-1] == ("my_ds/cfg:1.0.0", "test[:10]", None)


def test_tfds_missing_dataset_is_clear(monkeypatch):
  import tensorflow_datasets as tfds

  def fail(*a, **k):
    raise FileNotFoundError("not found")

  monkeypatch.setattr(tfds, "data_source", fail)
  with pytest.raises(DataConfigError, match=r"domain 'dom'.*tfds:nope@train.*"
                     r"cannot open the TFDS data source"):
    _docs(_spec(["tfds:nope"]))


def test_missing_path_empty_glob_directory_and_unknown_type(tmp_path):
  with pytest.raises(DataConfigError,
                     match=r"domain 'dom' \(train split\).*nope.jsonl.*no "
                     r"such file"):
    S.resolve_sources(_spec([str(tmp_path / "nope.jsonl")]), "train")
  with pytest.raises(DataConfigError, match=r"glob matched no files"):
    S.resolve_sources(_spec([str(tmp_path / "*.jsonl")]), "train")
  with pytest.raises(DataConfigError, match=r"is a directory"):
    S.resolve_sources(_spec([str(tmp_path)]), "train")
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(DataConfigError, match=r"x.csv has an unsupported type"):
    S.resolve_sources(_spec([str(tmp_path / "x.csv")]), "train")
  with pytest.raises(DataConfigError, match=r"domain 'dom' \(validation "
                     r"split\)"):
    S.resolve_sources(_spec(["x"], [str(tmp_path / "v.jsonl")]), "validation")


def test_non_utf8_error_names_file_and_offset(tmp_path):
  p = tmp_path / "bad.jsonl"
  good = b'{"text": "fine"}\n'
  p.write_bytes(good + b'{"text": "caf\xe9"}\n')
  offset = len(good) + len(b'{"text": "caf')
  with pytest.raises(DataConfigError,
                     match=rf"domain 'dom'.*bad.jsonl \(line 2\).*invalid "
                     rf"UTF-8 byte.*offset {offset}\b.*on_decode_error"):
    _docs(_spec([str(p)]))
  assert _docs(_spec([str(p)]), on_decode_error="replace") == [
      "fine", "caf\ufffd"]
  t = tmp_path / "bad.txt"
  t.write_bytes(b"ab\xffcd")
  with pytest.raises(DataConfigError, match=r"bad.txt \(file\).*offset 2\b"):
    _docs(_spec([str(t)]))
