"""The `data` section of a ddk_jax config, and its validation.

Every key is documented in `default_data_config()` and in docs/data.md.
`domain_specs(data_cfg)` checks the section and returns the domains in a
normalised form; it raises `DataConfigError` (a `ValueError`) whose message
names the offending key or domain and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

# Names become directory names under `prepared_dir`, so keep them path-safe.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

TXT_SPLIT_MODES = ("file", "blank_line")
ARRAY_RECORD_FORMATS = ("text", "json")
DECODE_ERROR_POLICIES = ("error", "replace")


class DataConfigError(ValueError):
  """A problem with the data config or the data it points to."""


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the `data` config section with its defaults.

  Keys:
    domains: list of dicts, one per domain, in domain-id order. Keys of a
      domain dict:
        name: unique name ([A-Za-z0-9_.-], used as a directory name).
        train: list of sources (a single string is accepted). A source is a
          local or gs:// path or glob of .jsonl / .jsonl.gz / .txt / .parquet /
          ArrayRecord files, or "tfds:NAME[@SPLIT]" for a TFDS ArrayRecord
          data source (SPLIT defaults to "train" here and "validation" in the
          validation list, and may use TFDS slicing like "train[:90%]").
        validation: list of sources for the validation split. Empty: hold out
          `num_validation_docs` train documents, chosen deterministically.
        text_field: field holding the text in .jsonl/.parquet/TFDS/json
          ArrayRecord records (default "text").
        weight: initial (and, for static mixtures, fixed) mixture weight;
          weights are normalised over domains (default 1.0).
        txt_split: for .txt files, "file" (one document per file, default) or
          "blank_line" (one document per block separated by blank lines).
        array_record_format: ArrayRecord records hold "text" (UTF-8 bytes,
          default) or "json" (a JSON object with `text_field`).
        num_validation_docs: per-domain override of the global key.
    tokenizer: local path of a Hugging Face tokenizer: a tokenizer.json file or
      a directory with tokenizer.json (+ tokenizer_config.json).
    bos_token / eos_token: optional token strings overriding the tokenizer's
      BOS / EOS (needed for a bare tokenizer.json whose special tokens are not
      recognised). None: use the tokenizer's own.
    seq_len: packed row length S; each row holds S input and S target ids.
    num_validation_docs: documents held out per domain when a domain gives no
      validation sources (paper: 500).
    prepared_dir: where `python -m ddk_jax.data.prepare` writes ArrayRecord
      shards and manifest.json; a local (or mounted, e.g. gcsfuse) path.
    demo_corpus_dir: if set, `prepare` first builds (or reuses) the demo
      corpus there (see ddk_jax.data.demo_corpus).
    seed: seeds held-out selection, per-domain shuffles and mixture draws.
    shuffle: shuffle each domain's documents (a new order every epoch).
    num_threads: reader threads per domain (grain ReadOptions). 0 (default)
      reads in the consumer thread: the pipeline is CPU-bound Python, so
      threads only pay off when storage is slow.
    prefetch_buffer_size: documents read ahead per domain (when num_threads>0).
    docs_per_shard: documents per ArrayRecord shard written by prepare.
    tokenize_batch_size: documents per tokenizer call in prepare (the Rust
      tokenizer parallelises within a batch).
    num_prepare_workers: worker processes that tokenize shards in prepare.
      0 (default): one per CPU core; 1: tokenize in the prepare process.
      The prepared shards are the same whatever the number.
    on_decode_error: "error" (default: fail naming file and byte offset) or
      "replace" (invalid UTF-8 bytes become U+FFFD).
    tfds_data_dir: data_dir passed to tfds.data_source (None: TFDS default).
  """
  c = ml_collections.ConfigDict()
  c.domains = []
  c.tokenizer = ""
  c.bos_token = ml_collections.FieldReference(None, field_type=str)
  c.eos_token = ml_collections.FieldReference(None, field_type=str)
  c.seq_len = 1024
  c.num_validation_docs = 500
  c.prepared_dir = ""
  c.demo_corpus_dir = ml_collections.FieldReference(None, field_type=str)
  c.seed = 0
  c.shuffle = True
  c.num_threads = 0
  c.prefetch_buffer_size = 64
  c.docs_per_shard = 50_000
  c.tokenize_batch_size = 512
  c.num_prepare_workers = 0
  c.on_decode_error = "error"
  c.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
  return c


@dataclasses.dataclass(frozen=True)
class DomainSpec:
  """One domain of the data config, checked and with defaults filled in."""

  name: str
  domain_id: int
  train: tuple[str, ...]
  validation: tuple[str, ...]
  text_field: str
  weight: float
  txt_split: str
  array_record_format: str
  num_validation_docs: int

  @property
  def holds_out_validation(self) -> bool:
    return not self.validation

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_DOMAIN_KEYS = {
    "name", "train", "validation", "text_field", "weight", "txt_split",
    "array_record_format", "num_validation_docs",
}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(
      cfg, key, default)


def _as_source_list(value: Any, where: str) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, Sequence) or not all(
      isinstance(v, str) and v for v in value):
    raise DataConfigError(
        f"{where} must be a list of non-empty path/glob/tfds strings, got "
        f"{value!r}.")
  return tuple(value)


def _check_int(value: Any, key: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise DataConfigError(
        f"data.{key} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def check_weights(weights: Sequence[float], names: Sequence[str],
                  where: str = "weights") -> list[float]:
  """Returns weights as python floats, or raises a clear DataConfigError.

  A weight list must have one finite, non-negative entry per domain, with a
  positive sum. A zero weight for some domains is allowed: that domain is
  simply never drawn while its weight is zero.
  """
  try:
    w = [float(x) for x in weights]
  except (TypeError, ValueError) as e:
    raise DataConfigError(
        f"{where}: expected a list of {len(names)} numbers (one per domain "
        f"{list(names)}), got {weights!r}.") from e
  if len(w) != len(names):
    raise DataConfigError(
        f"{where}: got {len(w)} weights for {len(names)} domains "
        f"{list(names)}; give exactly one weight per domain, in domain order.")
  for name, x in zip(names, w):
    if not math.isfinite(x):
      raise DataConfigError(
          f"{where}: weight of domain {name!r} is {x}; weights must be finite.")
    if x < 0:
      raise DataConfigError(
          f"{where}: weight of domain {name!r} is {x}; weights must be >= 0.")
  if sum(w) <= 0:
    raise DataConfigError(
        f"{where}: all weights are zero {w}; at least one domain needs a "
        "positive weight.")
  return w


def domain_specs(data_cfg: Any) -> list[DomainSpec]:
  """Checks `data_cfg` and returns its domains with defaults filled in."""
  domains = _get(data_cfg, "domains")
  if not domains:
    raise DataConfigError(
        "data.domains is empty; add at least one domain dict with `name` and "
        "`train` (see docs/data.md).")
  seq_len = _check_int(_get(data_cfg, "seq_len"), "seq_len", 2)
  del seq_len
  global_val = _check_int(
      _get(data_cfg, "num_validation_docs", 500), "num_validation_docs", 0)
  _check_int(_get(data_cfg, "docs_per_shard", 50_000), "docs_per_shard", 1)
  _check_int(_get(data_cfg, "num_threads", 2), "num_threads", 0)
  _check_int(_get(data_cfg, "num_prepare_workers", 0), "num_prepare_workers", 0)
  policy = _get(data_cfg, "on_decode_error", "error")
  if policy not in DECODE_ERROR_POLICIES:
    raise DataConfigError(
        f"data.on_decode_error must be one of {DECODE_ERROR_POLICIES}, got "
        f"{policy!r}.")
  seed = _get(data_cfg, "seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int) or not (
      0 <= seed < 2**32):
    raise DataConfigError(f"data.seed must be an int in [0, 2**32), got "
                          f"{seed!r}.")

  specs: list[DomainSpec] = []
  seen: dict[str, int] = {}
  for i, d in enumerate(domains):
    if not isinstance(d, Mapping) and not hasattr(d, "get"):
      raise DataConfigError(
          f"data.domains[{i}] must be a dict, got {type(d).__name__}.")
    d = dict(d)
    name = d.get("name")
    where = f"data.domains[{i}] ({name!r})"
    if not isinstance(name, str) or not _NAME_RE.match(name):
      raise DataConfigError(
          f"{where}: `name` must match {_NAME_RE.pattern} (it becomes a "
          f"directory name), got {name!r}.")
    if name in seen:
      raise DataConfigError(
          f"duplicate domain name {name!r} in data.domains[{seen[name]}] and "
          f"data.domains[{i}]; domain names must be unique (merge the "
          "sources into one domain or rename one).")
    seen[name] = i
    unknown = set(d) - _DOMAIN_KEYS
    if unknown:
      raise DataConfigError(
          f"{where}: unknown key(s) {sorted(unknown)}; allowed keys are "
          f"{sorted(_DOMAIN_KEYS)}.")
    train = _as_source_list(d.get("train"), f"{where}.train")
    if not train:
      raise DataConfigError(
          f"{where}: `train` lists no sources; give at least one path, glob "
          "or tfds:NAME source.")
    validation = _as_source_list(d.get("validation"), f"{where}.validation")
    text_field = d.get("text_field", "text")
    if not isinstance(text_field, str) or not text_field:
      raise DataConfigError(f"{where}: `text_field` must be a non-empty "
                            f"string, got {text_field!r}.")
    txt_split = d.get("txt_split", "file")
    if txt_split not in TXT_SPLIT_MODES:
      raise DataConfigError(f"{where}: `txt_split` must be one of "
                            f"{TXT_SPLIT_MODES}, got {txt_split!r}.")
    ar_format = d.get("array_record_format", "text")
    if ar_format not in ARRAY_RECORD_FORMATS:
      raise DataConfigError(f"{where}: `array_record_format` must be one of "
                            f"{ARRAY_RECORD_FORMATS}, got {ar_format!r}.")
    n_val = d.get("num_validation_docs")
    n_val = global_val if n_val is None else _check_int(
        n_val, f"domains[{i}].num_validation_docs", 0)
    if not validation and n_val == 0:
      raise DataConfigError(
          f"{where}: the validation split would be empty (no `validation` "
          "sources and num_validation_docs = 0); DDK needs validation data "
          "for every domain: give validation files or num_validation_docs > "
          "0.")
    weight = d.get("weight", 1.0)
    specs.append(DomainSpec(
        name=name, domain_id=i, train=train, validation=validation,
        text_field=text_field, weight=weight, txt_split=txt_split,
        array_record_format=ar_format, num_validation_docs=n_val))
  weights = check_weights([s.weight for s in specs], [s.name for s in specs],
                          where="data.domains[*].weight")
  return [dataclasses.replace(s, weight=w) for s, w in zip(specs, weights)]


def domain_names(data_cfg: Any) -> list[str]:
  return [s.name for s in domain_specs(data_cfg)]


def initial_weights(data_cfg: Any) -> list[float]:
  """Normalised initial mixture weights, in domain order."""
  w = [s.weight for s in domain_specs(data_cfg)]
  total = sum(w)
  return [x / total for x in w]


def with_defaults(data_cfg: Any) -> ml_collections.ConfigDict:
  """A copy of `data_cfg` (ConfigDict or dict) with missing keys defaulted.

  Unknown keys raise DataConfigError (they are usually typos).
  """
  if isinstance(data_cfg, ml_collections.ConfigDict):
    given = data_cfg.to_dict()
  elif isinstance(data_cfg, Mapping):
    given = dict(data_cfg)
  else:
    raise TypeError(f"data config must be a ConfigDict or dict, got "
                    f"{type(data_cfg).__name__}.")
  cfg = default_data_config()
  unknown = sorted(set(given) - set(cfg.keys()))
  if unknown:
    raise DataConfigError(
        f"unknown data config key(s) {unknown}; known keys: "
        f"{sorted(cfg.keys())} (see docs/data.md).")
  for k, v in given.items():
    if isinstance(v, Sequence) and not isinstance(v, str):
      v = [dict(x) if isinstance(x, Mapping) else x for x in v]
    cfg[k] = v
  return cfg


def domain_seed(seed: int, name: str, purpose: str) -> int:
  """A 32-bit seed for one domain and purpose ("holdout", "shuffle").

  Derived from the domain's name, not its position, so adding or reordering
  domains does not change another domain's hold-out or order.
  """
  return (int(seed) * 1_000_003 + zlib.crc32(f"{purpose}:{name}".encode())
          ) % 2**32


def require_key(data_cfg: Any, key: str) -> Any:
  value = _get(data_cfg, key)
  if value in (None, ""):
    raise DataConfigError(f"data.{key} is not set; {_KEY_HELP.get(key, '')}")
  return value


_KEY_HELP = {
    "tokenizer": "set it to a local tokenizer.json file or HF tokenizer "
                 "directory.",
    "prepared_dir": "set it to the directory where prepared shards live "
                    "(written by python -m ddk_jax.data.prepare).",
}
