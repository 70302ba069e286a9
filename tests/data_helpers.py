"""Small helpers for tests of ddk_jax.data (tiny corpora, tiny tokenizers)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from ddk_jax.data.config import default_data_config
from ddk_jax.data.tokenizer import train_bpe_tokenizer

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu "
          "nu xi omicron pi rho sigma tau upsilon phi chi psi omega").split()


def make_texts(n: int, prefix: str = "doc", min_words: int = 3,
               max_words: int = 40, seed: int = 0) -> list[str]:
  """n distinct documents "<prefix> <i> : words..." of varying length."""
  import random  # pylint: disable=g-import-not-at-top
  rng = random.Random(seed)
  return [f"{prefix} {i} : " + " ".join(
      rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words)))
          for i in range(n)]


def write_jsonl(path: str, texts: Sequence[str], field: str = "text") -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({field: t}) + "\n")
  return path


def make_tokenizer(out_dir: str, vocab_size: int = 400) -> str:
  """A tiny byte-level BPE tokenizer directory trained on make_texts."""
  texts = make_texts(300) + make_texts(50, prefix="other")
  return train_bpe_tokenizer(texts, out_dir, vocab_size=vocab_size)


def data_config(tmp: str, domains: list[dict[str, Any]], tokenizer: str, **kw
                ) -> ml_collections.ConfigDict:
  cfg = default_data_config()
  cfg.domains = domains
  cfg.tokenizer = tokenizer
  cfg.prepared_dir = os.path.join(tmp, "prepared")
  cfg.seq_len = 32
  cfg.num_validation_docs = 5
  cfg.num_threads = 0
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def documents_from_rows(rows, bos_id: int) -> list[tuple[int, ...]]:
  """Recovers the documents (without BOS/EOS) from packed rows in order.

  Concat-then-split keeps tokens in order, so concatenating every row's
  non-padding inputs gives BOS d1 BOS d2 ...; splitting at BOS gives the
  documents back, even those split across rows.
  """
  stream: list[int] = []
  for r in rows:
    stream.extend(r["inputs"][r["segment_ids"] > 0].tolist())
  docs, current = [], None
  for t in stream:
    if t == bos_id:
      if current is not None:
        docs.append(tuple(current))
      current = []
    else:
      current.append(t)
  if current is not None:
    docs.append(tuple(current))
  return docs
