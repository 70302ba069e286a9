"""Tests of tokenizer loading, BOS/EOS handling, hashing and identity checks."""

import json
import os
import shutil

import numpy as np
import pytest

import data_helpers as testing
from ddk_jax.data import tokenizer as T
from ddk_jax.data.config import DataConfigError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return testing.make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_load_dir_and_file_bos_eos(tok_dir, tmp_path):
  t = T.load_tokenizer(tok_dir)
  assert (t.bos_id, t.eos_id) == (0, 1)  # from tokenizer_config.json
  # A bare tokenizer.json: BOS/EOS found among its special tokens by name.
  bare = str(tmp_path / "tokenizer.json")
  shutil.copy(os.path.join(tok_dir, "tokenizer.json"), bare)
  tf = T.load_tokenizer(bare)
  assert (tf.bos_id, tf.eos_id) == (0, 1)
  assert t.hash == tf.hash == T.tokenizer_hash(bare)
  assert t.storage_dtype() == np.uint16


def test_documents_are_bos_ids_eos(tok_dir):
  t = T.load_tokenizer(tok_dir)
  ids = t.backend.encode("doc 1 : alpha beta", add_special_tokens=False).ids
  (doc,) = t.encode_documents(["doc 1 : alpha beta"])
  assert doc.dtype == np.int32
  assert doc.tolist() == [0] + ids + [1]
  no_bos = T.load_tokenizer(tok_dir, bos_token=None)
  assert no_bos.bos_id is None
  assert no_bos.encode_documents(["doc 1 : alpha beta"])[0].tolist() == (
      ids + [1])
  assert no_bos.hash != t.hash  # BOS handling changes the ids


def test_truncation_in_tokenizer_json_is_ignored(tok_dir, tmp_path):
  d = tmp_path / "trunc"
  shutil.copytree(tok_dir, d)
  j = json.loads((d / "tokenizer.json").read_text())
  j["truncation"] = {"direction": "Right", "max_length": 4, "strategy":
                     "LongestFirst", "stride": 0}
  (d / "tokenizer.json").write_text(json.dumps(j))
  t = T.load_tokenizer(str(d))
  long_text = " ".join(["alpha"] * 50)
  assert len(t.encode_documents([long_text])[0]) > 50
  assert t.hash == T.load_tokenizer(tok_dir).hash


def test_tokenizer_config_null_bos_and_overrides(tok_dir, tmp_path):
  d = tmp_path / "qwen_like"
  shutil.copytree(tok_dir, d)
  cfg = json.loads((d / "tokenizer_config.json").read_text())
  cfg["bos_token"] = None
  cfg["eos_token"] = {"content": "<|pad|>", "special": True}  # old format
  (d / "tokenizer_config.json").write_text(json.dumps(cfg))
  t = T.load_tokenizer(str(d))
  assert (t.bos_id, t.eos_id) == (None, 2)
  t = T.load_tokenizer(str(d), bos_token="<|bos|>", eos_token="<|eos|>")
  assert (t.bos_id, t.eos_id) == (0, 1)
  with pytest.raises(DataConfigError, match=r"EOS token '<nope>' is not in "
                     r"the vocabulary.*data.eos_token"):
    T.load_tokenizer(str(d), eos_token="<nope>")


def test_missing_eos_and_missing_path(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  p = str(tmp_path / "tokenizer.json")
  tok.save(p)
  with pytest.raises(DataConfigError, match=r"no EOS token found.*"
                     r"data.eos_token"):
    T.load_tokenizer(p)
  with pytest.raises(DataConfigError, match=r"no such file.*data.tokenizer"):
    T.load_tokenizer(str(tmp_path / "missing"))
  with pytest.raises(DataConfigError, match=r"data.tokenizer is not set"):
    T.load_tokenizer("")


def test_check_same_tokenizer(tok_dir, tmp_path):
  a = T.load_tokenizer(tok_dir)
  T.check_same_tokenizer(a, T.load_tokenizer(tok_dir))  # same: no error
  other_dir = str(tmp_path / "other")
  T.train_bpe_tokenizer(testing.make_texts(200, "zzz", seed=5), other_dir,
                        vocab_size=400)
  with pytest.raises(DataConfigError,
                     match=r"teacher tokenizer .* student tokenizer .* "
                     r"differ: \d+ ids map to different tokens \(id \d+: .*"
                     r"Logit KD needs identical tokenizers"):
    T.check_same_tokenizer(a, T.load_tokenizer(other_dir))
  small_dir = str(tmp_path / "small")
  T.train_bpe_tokenizer(testing.make_texts(200), small_dir, vocab_size=300)
  with pytest.raises(DataConfigError, match=r"vocab size 400 vs 300"):
    T.check_same_tokenizer(a, T.load_tokenizer(small_dir))
  with pytest.raises(DataConfigError, match=r"BOS/EOS ids \(0, 1\) vs "
                     r"\(None, 1\)"):
    T.check_same_tokenizer(a, T.load_tokenizer(tok_dir, bos_token=None))
  T.check_vocab_fits(a, 400)
  with pytest.raises(DataConfigError, match=r"vocab_size 399.*at least 400"):
    T.check_vocab_fits(a, 399, "student")


def test_transformers_loads_our_tokenizer_dir_with_same_hash(tok_dir):
  from transformers import AutoTokenizer, PreTrainedTokenizerFast
  hf = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True,
                                     trust_remote_code=False)
  assert (hf.bos_token, hf.eos_token, hf.pad_token) == (
      "<|bos|>", "<|eos|>", "<|pad|>")
  ours = T.load_tokenizer(tok_dir)
  assert T.tokenizer_hash(hf) == ours.hash
  T.check_same_tokenizer(hf, ours)
  fast = PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(tok_dir, "tokenizer.json"))
  assert fast("alpha beta")["input_ids"] == ours.backend.encode(
      "alpha beta", add_special_tokens=False).ids
