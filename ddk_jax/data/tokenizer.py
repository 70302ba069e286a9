"""Hugging Face tokenizers from local paths, identity checks and hashing.

`load_tokenizer(path)` accepts a tokenizer.json file or a Hugging Face
tokenizer directory. It uses the `tokenizers` library directly (fast, no
transformers import); a directory without tokenizer.json (e.g. only a
SentencePiece model) is converted by `transformers.AutoTokenizer` with
`local_files_only=True` and never `trust_remote_code`.

BOS/EOS: every document becomes `[BOS] + ids + [EOS]`, with BOS only if the
tokenizer has one (Qwen-style tokenizers have none). The special tokens come
from, in order: explicit `bos_token` / `eos_token` arguments (the data config
keys), `tokenizer_config.json` / `special_tokens_map.json` next to the
tokenizer (an explicit null there means "none"), then well-known names among
the tokenizer's special added tokens. An EOS token is required. Text is
encoded with `add_special_tokens=False` (the tokenizer's own post-processor is
ignored) and with truncation and padding switched off, so a document is never
cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers

from ddk_jax.data.config import DataConfigError

_BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>", "[BOS]",
              "<|startoftext|>")
_EOS_NAMES = ("<|eos|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]",
              "<|endoftext|>")
_UNSET = object()


@dataclasses.dataclass
class TextTokenizer:
  """A `tokenizers.Tokenizer` plus the BOS/EOS ids the data pipeline uses."""

  backend: tokenizers.Tokenizer
  path: str
  bos_id: int | None
  eos_id: int

  def __post_init__(self):
    # Some tokenizer.json files enable truncation/padding; documents must
    # never be cut or padded at tokenization time.
    self.backend.no_truncation()
    self.backend.no_padding()
    self._hash: str | None = None

  @property
  def vocab_size(self) -> int:
    """Number of ids including added tokens (max id + 1 for dense vocabs)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def max_id(self) -> int:
    return max(self.backend.get_vocab(with_added_tokens=True).values())

  def storage_dtype(self) -> np.dtype:
    """Smallest unsigned dtype holding every id (uint16 saves half the disk)."""
    return np.dtype(np.uint16) if self.max_id < 2**16 else np.dtype(np.uint32)

  def encode_documents(self, texts: Sequence[str],
                       dtype: Any = np.int32) -> list[np.ndarray]:
    """Returns `[BOS] + ids + [EOS]` for each text (BOS only if defined)."""
    encodings = self.backend.encode_batch_fast(list(texts),
                                               add_special_tokens=False)
    start = 0 if self.bos_id is None else 1
    out = []
    for enc in encodings:
      ids = enc.ids
      arr = np.empty(len(ids) + start + 1, dtype=dtype)
      if start:
        arr[0] = self.bos_id
      arr[start:-1] = ids
      arr[-1] = self.eos_id
      out.append(arr)
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return self.backend.decode([int(i) for i in ids],
                               skip_special_tokens=False)

  @property
  def hash(self) -> str:
    if self._hash is None:
      self._hash = tokenizer_hash(self)
    return self._hash


def _token_content(value: Any) -> str | None:
  if value is None:
    return None
  if isinstance(value, dict):  # AddedToken serialised as a dict.
    return value.get("content")
  return str(value)


def _special_tokens_from_files(directory: str) -> dict[str, Any]:
  """bos/eos token strings from tokenizer_config.json / special_tokens_map."""
  found: dict[str, Any] = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    p = os.path.join(directory, name)
    if not os.path.isfile(p):
      continue
    with open(p, encoding="utf-8") as f:
      cfg = json.load(f)
    for key in ("bos_token", "eos_token"):
      if key in cfg:  # Later files (tokenizer_config) take precedence.
        found[key] = _token_content(cfg[key])
  return found


def _token_id(backend: tokenizers.Tokenizer, token: str, what: str,
              path: str) -> int:
  tid = backend.token_to_id(token)
  if tid is None:
    raise DataConfigError(
        f"tokenizer {path}: {what} token {token!r} is not in the vocabulary. "
        f"Fix data.{what.lower()}_token.")
  return tid


# The files a tokenizer is made of; what else an HF directory holds (weights) is not copied.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json")


def _local_copy(url: str) -> str:
  """A local copy of a tokenizer on gs:// (a tokenizer.json or an HF directory), cached
  under ~/.cache/ddk_jax/tokenizers by URL; the tokenizer libraries read local files only."""
  import hashlib
  from ddk_jax import storage
  cache = os.path.join(os.path.expanduser("~/.cache/ddk_jax/tokenizers"),
                       hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16])
  try:
    if url.endswith(".json"):
      names, src_dir = [url.rsplit("/", 1)[1]], url.rsplit("/", 1)[0]
    else:
      names, src_dir = [n for n in _TOKENIZER_FILES if storage.exists(storage.join(url, n))], url
    if not names:
      raise DataConfigError(f"tokenizer {url}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...) "
                            "there. Fix data.tokenizer.")
    tmp = f"{cache}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for n in names:
      with open(os.path.join(tmp, n), "wb") as f:
        f.write(storage.read_bytes(storage.join(src_dir, n)))
  except OSError as e:
    raise DataConfigError(f"tokenizer {url}: cannot be read ({e}). Check the path and your access to the "
                          "bucket.") from None
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  if os.path.isdir(cache):
    import shutil
    shutil.rmtree(cache, ignore_errors=True)
  os.replace(tmp, cache)
  return os.path.join(cache, names[0]) if url.endswith(".json") else cache


def load_tokenizer(path: str, *, bos_token: Any = _UNSET,
                   eos_token: Any = _UNSET) -> TextTokenizer:
  """Loads a tokenizer from a tokenizer.json or HF directory (local, or gs:// copied locally).

  `bos_token` / `eos_token`: token strings overriding the tokenizer's own
  (pass None for bos_token to force "no BOS"). Unset: detected as described in
  the module docstring.
  """
  if not path:
    raise DataConfigError(
        "data.tokenizer is not set; give a local tokenizer.json file or a "
        "Hugging Face tokenizer directory.")
  if "://" in str(path):
    path = _local_copy(str(path))
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataConfigError(f"tokenizer {path}: no such file or directory. Fix "
                          "data.tokenizer.")
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if os.path.isdir(path):
    json_path = os.path.join(path, "tokenizer.json")
    if os.path.isfile(json_path):
      backend = tokenizers.Tokenizer.from_file(json_path)
    else:
      backend = _convert_with_transformers(path)
  else:
    try:
      backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception.
      raise DataConfigError(
          f"tokenizer {path}: not a tokenizer.json file ({e}). Fix "
          "data.tokenizer.") from None

  from_files = _special_tokens_from_files(directory)
  specials = {v.content for v in backend.get_added_tokens_decoder().values()
              if v.special}

  def pick(key: str, override: Any, names: Sequence[str]) -> str | None:
    if override is not _UNSET and override is not None:
      return override
    if override is None and key == "bos_token":
      return None
    if key in from_files:
      return from_files[key]
    return next((n for n in names if n in specials), None)

  bos = pick("bos_token", bos_token, _BOS_NAMES)
  eos = pick("eos_token", eos_token, _EOS_NAMES)
  if eos is None:
    raise DataConfigError(
        f"tokenizer {path}: no EOS token found (no eos_token in "
        "tokenizer_config.json and no well-known EOS among its special "
        "tokens). Set data.eos_token to the token that ends a document.")
  bos_id = None if bos is None else _token_id(backend, bos, "BOS", path)
  eos_id = _token_id(backend, eos, "EOS", path)
  return TextTokenizer(backend=backend, path=path, bos_id=bos_id,
                       eos_id=eos_id)


def load_tokenizer_from_config(data_cfg: Any) -> TextTokenizer:
  kwargs = {}
  if data_cfg.get("bos_token") is not None:
    kwargs["bos_token"] = data_cfg.get("bos_token")
  if data_cfg.get("eos_token") is not None:
    kwargs["eos_token"] = data_cfg.get("eos_token")
  return load_tokenizer(data_cfg.get("tokenizer"), **kwargs)


def _convert_with_transformers(directory: str) -> tokenizers.Tokenizer:
  try:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    tok = AutoTokenizer.from_pretrained(
        directory, local_files_only=True, trust_remote_code=False)
  except Exception as e:  # transformers raises many types here.
    raise DataConfigError(
        f"tokenizer {directory}: has no tokenizer.json and transformers "
        f"could not load it ({e}). Save it as a fast tokenizer "
        "(tokenizer.json) and point data.tokenizer at it.") from None
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is None:
    raise DataConfigError(
        f"tokenizer {directory}: transformers loaded a slow tokenizer "
        f"({type(tok).__name__}); only fast (tokenizers-backed) tokenizers "
        "are supported.")
  return backend


def as_text_tokenizer(tok: Any, name: str = "tokenizer") -> TextTokenizer:
  """Accepts a TextTokenizer, a transformers fast tokenizer or a path."""
  if isinstance(tok, TextTokenizer):
    return tok
  if isinstance(tok, (str, os.PathLike)):
    return load_tokenizer(os.fspath(tok))
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is None:
    raise TypeError(f"{name}: expected a tokenizer.json path, a TextTokenizer "
                    f"or a transformers fast tokenizer, got {type(tok)}.")
  eos_id = getattr(tok, "eos_token_id", None)
  if eos_id is None:
    raise DataConfigError(f"{name}: the tokenizer has no EOS token.")
  return TextTokenizer(backend=backend,
                       path=getattr(tok, "name_or_path", name),
                       bos_id=getattr(tok, "bos_token_id", None),
                       eos_id=eos_id)


# Parts of tokenizer.json that decide which ids a text gets. The decoder,
# post-processor, truncation and padding do not (we encode without special
# tokens and without truncation), and transformers rewrites some of them on
# load, so they are left out of the hash.
_ID_RELEVANT = ("added_tokens", "normalizer", "pre_tokenizer", "model")


def _canonical_parts(tok: TextTokenizer) -> dict[str, Any]:
  full = json.loads(tok.backend.to_str())
  parts = {k: full.get(k) for k in _ID_RELEVANT}
  parts["bos_id"] = tok.bos_id
  parts["eos_id"] = tok.eos_id
  return parts


def tokenizer_hash(tok: Any) -> str:
  """A stable sha256 of everything that decides the token ids of a text."""
  tok = as_text_tokenizer(tok)
  blob = json.dumps(_canonical_parts(tok), sort_keys=True,
                    separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_same_tokenizer(a: Any, b: Any, names: tuple[str, str] = (
    "teacher", "student")) -> None:
  """Raises DataConfigError unless `a` and `b` give every text the same ids.

  Logit distillation compares the teacher's and the student's distributions
  id by id, so both must use the same vocabulary (same size, same token for
  every id) and the same special tokens.
  """
  ta, tb = as_text_tokenizer(a, names[0]), as_text_tokenizer(b, names[1])
  na, nb = names
  head = (f"{na} tokenizer ({ta.path}) and {nb} tokenizer ({tb.path}) "
          "differ: ")
  fix = (" Logit KD needs identical tokenizers: give the student the "
         "teacher's tokenizer (and an embedding of the teacher's vocab size).")
  if ta.vocab_size != tb.vocab_size:
    raise DataConfigError(head + f"vocab size {ta.vocab_size} vs "
                          f"{tb.vocab_size}." + fix)
  va = ta.backend.get_vocab(with_added_tokens=True)
  vb = tb.backend.get_vocab(with_added_tokens=True)
  if va != vb:
    ia = {i: t for t, i in va.items()}
    ib = {i: t for t, i in vb.items()}
    diff = [i for i in sorted(set(ia) | set(ib)) if ia.get(i) != ib.get(i)]
    shown = ", ".join(f"id {i}: {ia.get(i)!r} vs {ib.get(i)!r}"
                      for i in diff[:5])
    raise DataConfigError(head + f"{len(diff)} ids map to different tokens "
                          f"({shown})." + fix)
  if (ta.bos_id, ta.eos_id) != (tb.bos_id, tb.eos_id):
    raise DataConfigError(
        head + f"BOS/EOS ids ({ta.bos_id}, {ta.eos_id}) vs "
        f"({tb.bos_id}, {tb.eos_id}). Set the same bos_token/eos_token.")
  pa, pb = _canonical_parts(ta), _canonical_parts(tb)
  other = [k for k in _ID_RELEVANT if pa[k] != pb[k]]
  if other:
    raise DataConfigError(
        head + f"same vocabulary but different {other}, so the same text "
        "gets different ids." + fix)


def check_vocab_fits(tok: Any, model_vocab_size: int, name: str = "model"
                     ) -> None:
  """Raises unless every token id is a valid row of the model's embedding."""
  t = as_text_tokenizer(tok)
  if t.max_id >= model_vocab_size:
    raise DataConfigError(
        f"{name} has vocab_size {model_vocab_size} but tokenizer {t.path} "
        f"uses ids up to {t.max_id}; the model's vocab_size must be at least "
        f"{t.max_id + 1}.")


# ------------------------------------------------------------------ training --

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>",
                  "pad_token": "<|pad|>"}


def train_bpe_tokenizer(texts: Sequence[str], out_dir: str, *,
                        vocab_size: int = 4096) -> str:
  """Trains a byte-level BPE tokenizer and saves it as an HF tokenizer dir.

  Special tokens <|bos|>, <|eos|>, <|pad|> get ids 0, 1, 2. Writes
  tokenizer.json and tokenizer_config.json (so `load_tokenizer(out_dir)` and
  `transformers.AutoTokenizer.from_pretrained(out_dir)` both find BOS/EOS/PAD).
  Deterministic for the same texts. Returns out_dir.
  """
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(texts, trainer)
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, f"tokenizer.json.tmp-{os.getpid()}")
  tok.save(tmp)
  os.replace(tmp, os.path.join(out_dir, "tokenizer.json"))
  config = dict(SPECIAL_TOKENS, tokenizer_class="PreTrainedTokenizerFast",
                model_max_length=1_000_000, clean_up_tokenization_spaces=False)
  tmp = os.path.join(out_dir, f"tokenizer_config.json.tmp-{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(out_dir, "tokenizer_config.json"))
  return out_dir
