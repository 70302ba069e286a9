"""Raw document sources: files and TFDS data sources -> text documents.

A domain's `train` / `validation` lists hold source specs:

* a local or gs:// path or glob (`*`, `?`, `[...]`, `**`) of files:
  `.jsonl` / `.jsonl.gz` (one JSON object per line, text in `text_field`;
  blank lines are ignored), `.txt` (one document per file, or per
  blank-line-separated block with `txt_split="blank_line"`), `.parquet`
  (column `text_field`), ArrayRecord (`*.array_record*`, records are UTF-8 text,
  or JSON objects with `array_record_format="json"`);
* `tfds:NAME[@SPLIT]`: a TFDS ArrayRecord data source via `tfds.data_source`.

Files are read in a fixed order (sources in config order, each glob's matches
sorted, duplicates dropped), so a document's index in the domain stream is
deterministic. That index is what deterministic hold-out uses.

Text must be UTF-8. With `on_decode_error="error"` (default) invalid bytes fail
with the file and byte offset; with "replace" they become U+FFFD.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from etils import epath

from ddk_jax.data.config import DataConfigError, DomainSpec

_GLOB_CHARS = set("*?[")
_PARQUET_BATCH = 1024
_ARRAY_RECORD_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class Source:
  """One file (or one TFDS split) of a domain split."""

  kind: str  # "jsonl", "jsonl.gz", "txt", "parquet", "array_record", "tfds"
  path: str  # file path, or TFDS dataset name for kind == "tfds"
  spec: str  # the config string this came from
  tfds_split: str | None = None

  def describe(self) -> str:
    if self.kind == "tfds":
      return f"tfds:{self.path}@{self.tfds_split}"
    return self.path


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """How to turn a domain's records into text."""

  domain: str
  split: str
  text_field: str = "text"
  txt_split: str = "file"
  array_record_format: str = "text"
  on_decode_error: str = "error"
  tfds_data_dir: str | None = None

  @classmethod
  def for_domain(cls, spec: DomainSpec, split: str, data_cfg: Any
                 ) -> "ReadOptions":
    return cls(
        domain=spec.name, split=split, text_field=spec.text_field,
        txt_split=spec.txt_split,
        array_record_format=spec.array_record_format,
        on_decode_error=data_cfg.get("on_decode_error", "error"),
        tfds_data_dir=data_cfg.get("tfds_data_dir"))

  def where(self, source: Source | str, detail: str = "") -> str:
    name = source.describe() if isinstance(source, Source) else source
    return (f"domain {self.domain!r} ({self.split} split), {name}"
            + (f" {detail}" if detail else ""))


def _kind_of(path: str) -> str | None:
  base = os.path.basename(path).lower()
  if base.endswith(".jsonl.gz"):
    return "jsonl.gz"
  if base.endswith(".jsonl"):
    return "jsonl"
  if base.endswith(".txt"):
    return "txt"
  if base.endswith(".parquet"):
    return "parquet"
  # ArrayRecord files are named *.array_record or, by TFDS,
  # *.array_record-00000-of-00008.
  if ".array_record" in base or ".arrayrecord" in base:
    return "array_record"
  return None


_SUPPORTED = (".jsonl, .jsonl.gz, .txt, .parquet, *.array_record*, or "
              "tfds:NAME[@SPLIT]")


def _expand_glob(pattern: str) -> list[str]:
  """Sorted matches of a local or remote (gs://) glob."""
  if "://" not in pattern:
    return sorted(p for p in glob_lib.glob(pattern, recursive=True)
                  if os.path.isfile(p))
  # Remote: glob from the longest prefix without glob characters.
  parts = pattern.split("/")
  first = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
  base = epath.Path("/".join(parts[:first]))
  rest = "/".join(parts[first:])
  return sorted(str(p) for p in base.glob(rest) if not p.is_dir())


def resolve_sources(spec: DomainSpec, split: str) -> list[Source]:
  """Expands a domain split's specs into an ordered list of Sources.

  Raises DataConfigError for a missing path, a glob without matches, a
  directory, or an unsupported file type, naming the domain and the spec.
  """
  specs = spec.train if split == "train" else spec.validation
  sources: list[Source] = []
  seen: set[str] = set()
  for s in specs:
    where = f"domain {spec.name!r} ({split} split) source {s!r}"
    if s.startswith("tfds:"):
      name, _, tsplit = s[len("tfds:"):].partition("@")
      if not name:
        raise DataConfigError(f"{where}: expected tfds:NAME[@SPLIT].")
      tsplit = tsplit or ("train" if split == "train" else "validation")
      key = f"tfds:{name}@{tsplit}"
      if key not in seen:
        seen.add(key)
        sources.append(Source("tfds", name, s, tsplit))
      continue
    if _GLOB_CHARS & set(s):
      paths = _expand_glob(s)
      if not paths:
        raise DataConfigError(
            f"{where}: the glob matched no files. Fix the path or pattern "
            "(globs are expanded relative to the current directory).")
    else:
      p = epath.Path(s)
      if not p.exists():
        raise DataConfigError(f"{where}: no such file. Fix the path.")
      if p.is_dir():
        raise DataConfigError(
            f"{where}: is a directory; give files or a glob such as "
            f"'{s.rstrip('/')}/*.jsonl'.")
      paths = [s]
    for p in paths:
      kind = _kind_of(p)
      if kind is None:
        raise DataConfigError(
            f"{where}: file {p} has an unsupported type; supported: "
            f"{_SUPPORTED}.")
      if p not in seen:
        seen.add(p)
        sources.append(Source(kind, p, s))
  return sources


def source_fingerprint(source: Source) -> dict[str, Any]:
  """What identifies a source's content cheaply: its name and size."""
  if source.kind == "tfds":
    return {"tfds": source.path, "split": source.tfds_split}
  try:
    size = epath.Path(source.path).stat().length
  except (OSError, AttributeError):
    size = os.path.getsize(source.path)
  return {"path": source.path, "size": int(size)}


# ----------------------------------------------------------------- decoding --


def _decode(raw: bytes, opts: ReadOptions, source: Source, base_offset: int,
            context: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if opts.on_decode_error == "replace":
      return raw.decode("utf-8", errors="replace")
    raise DataConfigError(
        opts.where(source, f"({context}): invalid UTF-8 byte "
                   f"{raw[e.start:e.start + 1]!r} at byte offset "
                   f"{base_offset + e.start}. Fix: re-encode the file as "
                   "UTF-8, or set data.on_decode_error='replace' to replace "
                   "invalid bytes with U+FFFD.")) from None


def _text_from_value(value: Any, opts: ReadOptions, source: Source,
                     context: str) -> str:
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  if isinstance(value, (bytes, bytearray, memoryview)):
    return _decode(bytes(value), opts, source, 0, context)
  # numpy bytes_/str_ scalars (TFDS) and 0-d arrays.
  item = getattr(value, "item", None)
  if item is not None:
    return _text_from_value(item(), opts, source, context)
  raise DataConfigError(opts.where(
      source, f"({context}): field {opts.text_field!r} holds "
      f"{type(value).__name__}, not text. Fix data.domains[*].text_field."))


def _field(record: Any, opts: ReadOptions, source: Source, context: str
           ) -> Any:
  if not isinstance(record, dict):
    raise DataConfigError(opts.where(
        source, f"({context}): expected a JSON object with field "
        f"{opts.text_field!r}, got {type(record).__name__}."))
  if opts.text_field not in record:
    raise DataConfigError(opts.where(
        source, f"({context}): record has no field {opts.text_field!r}; "
        f"its fields are {sorted(record)[:20]}. Fix the domain's "
        "`text_field`."))
  return record[opts.text_field]


# ------------------------------------------------------------------ readers --


def _open_binary(source: Source):
  f = epath.Path(source.path).open("rb")
  if source.kind == "jsonl.gz":
    return gzip.GzipFile(fileobj=f, mode="rb")
  return f


def _jsonl_lines(source: Source) -> Iterator[tuple[int, int, bytes]]:
  """Yields (line number, byte offset, line) of non-blank lines."""
  offset = 0
  with _open_binary(source) as f:
    for lineno, line in enumerate(f, 1):
      start = offset
      offset += len(line)
      if line.strip():
        yield lineno, start, line


def _iter_jsonl(source: Source, opts: ReadOptions) -> Iterator[str]:
  try:
    for lineno, start, line in _jsonl_lines(source):
      ctx = f"line {lineno}"
      text_line = _decode(line, opts, source, start, ctx)
      try:
        record = json.loads(text_line)
      except json.JSONDecodeError as e:
        raise DataConfigError(opts.where(
            source, f"({ctx}): invalid JSON: {e.msg} at column {e.colno}."
        )) from None
      yield _text_from_value(_field(record, opts, source, ctx), opts,
                             source, ctx)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataConfigError(opts.where(source, f": cannot read: {e}")) from None


def _txt_documents(source: Source, opts: ReadOptions) -> list[str]:
  with epath.Path(source.path).open("rb") as f:
    raw = f.read()
  text = _decode(raw, opts, source, 0, "file")
  if opts.txt_split == "file":
    return [text]
  # Blocks separated by one or more blank (whitespace-only) lines.
  blocks, current = [], []
  for line in text.splitlines():
    if line.strip():
      current.append(line)
    elif current:
      blocks.append("\n".join(current))
      current = []
  if current:
    blocks.append("\n".join(current))
  return blocks


def _parquet_file(source: Source, opts: ReadOptions):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    pf = pq.ParquetFile(epath.Path(source.path).open("rb"))
  except Exception as e:  # pyarrow raises several types for bad files.
    raise DataConfigError(opts.where(source, f": not a readable Parquet "
                                     f"file: {e}")) from None
  names = pf.schema_arrow.names
  if opts.text_field not in names:
    raise DataConfigError(opts.where(
        source, f": no column {opts.text_field!r}; columns are {names}. "
        "Fix the domain's `text_field`."))
  return pf


def _iter_parquet(source: Source, opts: ReadOptions) -> Iterator[str]:
  pf = _parquet_file(source, opts)
  row = 0
  for batch in pf.iter_batches(batch_size=_PARQUET_BATCH,
                               columns=[opts.text_field]):
    for value in batch.column(0).to_pylist():
      yield _text_from_value(value, opts, source, f"row {row}")
      row += 1


def _array_record_reader(source: Source, opts: ReadOptions):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if "://" in source.path:
    raise DataConfigError(opts.where(
        source, ": ArrayRecord sources must be local files; copy them to "
        "local disk (or convert to .jsonl) first."))
  try:
    return array_record_module.ArrayRecordReader(
        source.path, "readahead_buffer_size:0")
  except Exception as e:  # The C++ reader raises RuntimeError/ValueError.
    raise DataConfigError(opts.where(
        source, f": not a readable ArrayRecord file: {e}")) from None


def _iter_array_record(source: Source, opts: ReadOptions) -> Iterator[str]:
  reader = _array_record_reader(source, opts)
  try:
    n = reader.num_records()
    for begin in range(0, n, _ARRAY_RECORD_BATCH):
      records = reader.read(begin, min(n, begin + _ARRAY_RECORD_BATCH))
      for j, raw in enumerate(records):
        ctx = f"record {begin + j}"
        if opts.array_record_format == "text":
          yield _decode(raw, opts, source, 0, ctx)
        else:
          text = _decode(raw, opts, source, 0, ctx)
          try:
            record = json.loads(text)
          except json.JSONDecodeError as e:
            raise DataConfigError(opts.where(
                source, f"({ctx}): invalid JSON: {e.msg}; records must be "
                "JSON objects with array_record_format='json'.")) from None
          yield _text_from_value(_field(record, opts, source, ctx), opts,
                                 source, ctx)
  finally:
    reader.close()


def _tfds_source(source: Source, opts: ReadOptions):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(source.path, split=source.tfds_split,
                            data_dir=opts.tfds_data_dir)
  except Exception as e:  # TFDS raises many types for missing datasets.
    raise DataConfigError(opts.where(
        source, f": cannot open the TFDS data source: {e}. Fix: prepare the "
        "dataset in ArrayRecord format (tfds build --file_format=array_record)"
        " and set data.tfds_data_dir.")) from None


def _iter_tfds(source: Source, opts: ReadOptions) -> Iterator[str]:
  ds = _tfds_source(source, opts)
  for i in range(len(ds)):
    ctx = f"example {i}"
    yield _text_from_value(_field(dict(ds[i]), opts, source, ctx), opts,
                           source, ctx)


def iter_documents(source: Source, opts: ReadOptions) -> Iterator[str]:
  """Yields the source's documents as text, in a fixed order.

  Documents may be empty strings; the caller decides what to do with them
  (prepare skips them and counts them).
  """
  if source.kind in ("jsonl", "jsonl.gz"):
    yield from _iter_jsonl(source, opts)
  elif source.kind == "txt":
    yield from _txt_documents(source, opts)
  elif source.kind == "parquet":
    yield from _iter_parquet(source, opts)
  elif source.kind == "array_record":
    yield from _iter_array_record(source, opts)
  elif source.kind == "tfds":
    yield from _iter_tfds(source, opts)
  else:
    raise AssertionError(source.kind)


def count_documents(source: Source, opts: ReadOptions) -> int:
  """Number of documents `iter_documents` yields, computed cheaply."""
  if source.kind in ("jsonl", "jsonl.gz"):
    try:
      return sum(1 for _ in _jsonl_lines(source))
    except (OSError, EOFError, gzip.BadGzipFile) as e:
      raise DataConfigError(opts.where(source, f": cannot read: {e}")
                            ) from None
  if source.kind == "txt":
    if opts.txt_split == "file":
      return 1
    return len(_txt_documents(source, opts))
  if source.kind == "parquet":
    return int(_parquet_file(source, opts).metadata.num_rows)
  if source.kind == "array_record":
    reader = _array_record_reader(source, opts)
    try:
      return int(reader.num_records())
    finally:
      reader.close()
  if source.kind == "tfds":
    return len(_tfds_source(source, opts))
  raise AssertionError(source.kind)


def iter_split_documents(sources: Sequence[Source], opts: ReadOptions
                         ) -> Iterator[str]:
  """All documents of a list of sources, in order."""
  for source in sources:
    yield from iter_documents(source, opts)
