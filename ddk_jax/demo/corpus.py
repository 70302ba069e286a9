"""A small multi-domain demo corpus, built from any Python install + generators.

    python -m ddk_jax.demo.corpus --out DIR [--seed 0] [--scale 1.0]

Five domains of clearly different difficulty (origins and licenses in
docs/data.md):

  records     generated JSON / CSV records (low entropy, very regular)
  math        generated arithmetic and algebra worked examples
  code        Python standard-library source files (chunked)
  docstrings  docstrings of other standard-library modules (English prose)
  prose       `pydoc_data.topics`: the Python language reference topics

Each domain gets DIR/<name>/train.jsonl and DIR/<name>/validation.jsonl
({"text": ...} per line), and DIR/tokenizer/ holds a byte-level BPE tokenizer
(vocab 4096, <|bos|> <|eos|> <|pad|> = ids 0 1 2) trained on the train splits.

Deterministic given (seed, scale, vocab_size) on a given Python version (the
stdlib text is the Python install's). Cached: the corpus is built in a
temporary directory that is renamed to DIR when complete, with DIR/DONE
written last; `ensure_demo_corpus` returns at once when DIR/DONE matches.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from typing import Any

DEMO_VERSION = 1
DOMAINS = ("records", "math", "code", "docstrings", "prose")
DONE = "DONE"
# Characters of text per domain at scale 1.0 (~2.7 MB in total).
_BUDGET = {"records": 500_000, "math": 500_000, "code": 700_000,
           "docstrings": 550_000, "prose": 600_000}
_VALIDATION_DOCS = 60  # at most, per domain, at scale 1.0
_MAX_CHUNK = 2000  # characters per code / prose document


# ---------------------------------------------------------------- stdlib text --


def _stdlib_files() -> list[str]:
  """Relative paths of the standard library's .py files (no tests), sorted."""
  root = sysconfig.get_paths()["stdlib"]
  skip = {"site-packages", "dist-packages", "test", "tests", "idle_test",
          "__pycache__", "lib2to3", "turtledemo"}
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    for f in sorted(filenames):
      if f.endswith(".py"):
        out.append(os.path.relpath(os.path.join(dirpath, f), root))
  return sorted(out)


def _read_stdlib(rel: str) -> str | None:
  path = os.path.join(sysconfig.get_paths()["stdlib"], rel)
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, UnicodeDecodeError):
    return None


def _chunks(text: str, max_chars: int) -> list[str]:
  """Splits text at blank lines into pieces of at most ~max_chars."""
  pieces, current, size = [], [], 0
  for block in text.split("\n\n"):
    if current and size + len(block) > max_chars:
      pieces.append("\n\n".join(current))
      current, size = [], 0
    current.append(block)
    size += len(block) + 2
  if current:
    pieces.append("\n\n".join(current))
  return [p.strip("\n") for p in pieces if p.strip()]


def _take(docs, budget: int) -> list[str]:
  out, total = [], 0
  for d in docs:
    if total >= budget:
      break
    out.append(d)
    total += len(d)
  return out


def _code_docs(files: list[str], budget: int) -> list[str]:
  def gen():
    for rel in files:
      text = _read_stdlib(rel)
      if text:
        for chunk in _chunks(text, _MAX_CHUNK):
          yield f"# file: Lib/{rel}\n{chunk}"
  return _take(gen(), budget)


# A triple-quoted string that starts a line: in the standard library that
# is a module, class or function docstring (a regex: ast.parse of the
# modules would take seconds).
_DOCSTRING_RE = re.compile(r'^[ \t]*[rRuU]?("""|\'\'\')(.*?)\1',
                           re.MULTILINE | re.DOTALL)


def _docstring_docs(files: list[str], budget: int) -> list[str]:
  def gen():
    for rel in files:
      text = _read_stdlib(rel)
      if not text:
        continue
      module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
      for m in _DOCSTRING_RE.finditer(text):
        doc = inspect.cleandoc(m.group(2))
        if len(doc) >= 80:
          yield f"{module}\n\n{doc}"
  return _take(gen(), budget)


def _prose_docs(budget: int) -> list[str]:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  docs = []
  for name in sorted(topics.topics):
    docs.extend(_chunks(topics.topics[name], _MAX_CHUNK))
  return _take(docs, budget)


# ------------------------------------------------------------ generated text --


def _math_problem(rng: random.Random) -> str:
  kind = rng.randrange(6)
  if kind == 0:
    a, b = rng.randint(10, 9999), rng.randint(10, 9999)
    return f"Compute {a} + {b}.\n{a} + {b} = {a + b}."
  if kind == 1:
    a, b = rng.randint(12, 999), rng.randint(12, 99)
    tens, ones = b - b % 10, b % 10
    return (f"Compute {a} * {b}.\n{a} * {b} = {a} * {tens} + {a} * {ones} = "
            f"{a * tens} + {a * ones} = {a * b}.")
  if kind == 2:
    a, x = rng.randint(2, 12), rng.randint(-20, 20)
    b = rng.randint(-50, 50)
    c = a * x + b
    sb = f"+ {b}" if b >= 0 else f"- {-b}"
    op = "Subtract" if b >= 0 else "Add"
    return (f"Solve {a}x {sb} = {c}.\n{op} {abs(b)} on both sides: "
            f"{a}x = {c - b}.\nDivide both sides by {a}: x = {x}.\n"
            f"Check: {a} * {x} {sb} = {c}.")
  if kind == 3:
    p, q = rng.randint(-9, 9), rng.randint(-9, 9)
    s, prod = p + q, p * q

    def term(v: int, var: str) -> str:
      return f" + {v}{var}" if v >= 0 else f" - {-v}{var}"
    return (f"Factor x^2{term(s, 'x')}{term(prod, '')}.\nFind two numbers "
            f"with product {prod} and sum {s}: {p} and {q}.\n"
            f"x^2{term(s, 'x')}{term(prod, '')} = (x{term(p, '')})"
            f"(x{term(q, '')}).")
  if kind == 4:
    a, b = rng.randint(20, 2000), rng.randint(20, 2000)
    steps, x, y = [], max(a, b), min(a, b)
    while y:
      steps.append(f"{x} = {x // y} * {y} + {x % y}")
      x, y = y, x % y
    return (f"Find gcd({a}, {b}) with Euclid's algorithm.\n"
            + "\n".join(steps) + f"\nSo gcd({a}, {b}) = {x}.")
  k, m = rng.randint(2, 9), rng.randint(2, 9)
  c1, c2 = rng.randint(1, 9), rng.randint(1, 9)
  return (f"Simplify {k}(x + {c1}) + {m}(x + {c2}).\n{k}(x + {c1}) = {k}x + "
          f"{k * c1} and {m}(x + {c2}) = {m}x + {m * c2}.\nSum: {k + m}x + "
          f"{k * c1 + m * c2}.")


def _math_docs(rng: random.Random, budget: int) -> list[str]:
  def gen():
    while True:
      n = rng.randint(1, 5)
      yield "\n\n".join(f"Problem {i + 1}. {_math_problem(rng)}"
                        for i in range(n))
  return _take(gen(), budget)


_FIRST = ("Ada Alan Grace Edsger Barbara Donald John Margaret Ken Dennis "
          "Frances Radia Tim Linus Guido Bjarne Niklaus Leslie Shafi "
          "Sophie").split()
_LAST = ("Lovelace Turing Hopper Dijkstra Liskov Knuth Backus Hamilton "
         "Thompson Ritchie Allen Perlman Berners-Lee Torvalds Rossum "
         "Stroustrup Wirth Lamport Goldwasser Wilson").split()
_CITIES = ("Oslo Lima Quito Accra Hanoi Perth Porto Turin Leeds Dakar Cusco "
           "Split Bergen Malmo Kyoto").split()
_STATUS = ("active", "pending", "closed", "on_hold")
_ITEMS = ("bolt nut washer gear spring valve pump filter hose clamp sensor "
          "relay").split()


def _record(rng: random.Random, i: int) -> dict[str, Any]:
  return {
      "id": i,
      "name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
      "city": rng.choice(_CITIES),
      "date": f"20{rng.randint(10, 25)}-{rng.randint(1, 12):02d}-"
              f"{rng.randint(1, 28):02d}",
      "item": rng.choice(_ITEMS),
      "quantity": rng.randint(1, 500),
      "price": round(rng.uniform(0.5, 300.0), 2),
      "status": rng.choice(_STATUS),
  }


def _records_docs(rng: random.Random, budget: int) -> list[str]:
  def gen():
    next_id = 1000
    while True:
      recs = [_record(rng, next_id + j) for j in range(rng.randint(3, 12))]
      next_id += len(recs)
      if rng.random() < 0.5:
        yield json.dumps(recs, indent=1)
      else:
        keys = list(recs[0])
        yield "\n".join([",".join(keys)] + [
            ",".join(str(r[k]) for k in keys) for r in recs])
  return _take(gen(), budget)


# -------------------------------------------------------------------- build --


_DEFAULTS = {"seed": 0, "scale": 1.0, "vocab_size": 4096}


def _settings(seed: int, scale: float, vocab_size: int) -> dict[str, Any]:
  return {"version": DEMO_VERSION, "seed": int(seed), "scale": float(scale),
          "vocab_size": int(vocab_size)}


def _write_jsonl(path: str, texts: list[str]) -> int:
  with open(path, "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
  return os.path.getsize(path)


def _generate(seed: int, scale: float) -> dict[str, list[str]]:
  budget = {k: max(20_000, int(v * scale)) for k, v in _BUDGET.items()}
  files = _stdlib_files()
  random.Random(seed).shuffle(files)
  # Disjoint halves of the stdlib: code from one, docstrings from the other.
  return {
      "records": _records_docs(random.Random(seed * 7919 + 1),
                               budget["records"]),
      "math": _math_docs(random.Random(seed * 7919 + 2), budget["math"]),
      "code": _code_docs(files[0::2], budget["code"]),
      "docstrings": _docstring_docs(files[1::2], budget["docstrings"]),
      "prose": _prose_docs(budget["prose"]),
  }


def _build(out_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
  from ddk_jax.data.tokenizer import train_bpe_tokenizer  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  docs = _generate(settings["seed"], settings["scale"])
  stats, train_texts = {}, []
  for name in DOMAINS:
    d = list(docs[name])
    # About 10% of the documents, at most _VALIDATION_DOCS, at least 10.
    n_val = max(10, min(int(_VALIDATION_DOCS * min(1.0, settings["scale"])),
                        len(d) // 10))
    random.Random(settings["seed"] * 31 + DOMAINS.index(name)).shuffle(d)
    val, train = d[:n_val], d[n_val:]
    os.makedirs(os.path.join(out_dir, name))
    stats[name] = {
        "train_documents": len(train), "validation_documents": len(val),
        "train_bytes": _write_jsonl(os.path.join(out_dir, name,
                                                 "train.jsonl"), train),
        "validation_bytes": _write_jsonl(
            os.path.join(out_dir, name, "validation.jsonl"), val),
    }
    train_texts.extend(train)
  train_bpe_tokenizer(train_texts, os.path.join(out_dir, "tokenizer"),
                      vocab_size=settings["vocab_size"])
  return {"settings": settings, "domains": stats,
          "python": sys.version.split()[0],
          "build_seconds": round(time.time() - t0, 2)}


def _result(out_dir: str, done: dict[str, Any]) -> dict[str, Any]:
  return dict(done, out_dir=out_dir,
              tokenizer=os.path.join(out_dir, "tokenizer"),
              data_domains=demo_domains(out_dir))


def ensure_demo_corpus(out_dir: str, *, seed: int | None = None,
                       scale: float | None = None,
                       vocab_size: int | None = None,
                       log: Callable[[str], None] | None = None
                       ) -> dict[str, Any]:
  """Builds the demo corpus in out_dir unless it is already there.

  seed / scale / vocab_size default to 0 / 1.0 / 4096 for a new build; an
  existing corpus must match the ones given explicitly (ValueError
  otherwise) and is accepted as is when none are given.

  Returns {"settings", "domains" (per-domain counts), "out_dir", "tokenizer",
  "data_domains" (the data.domains list), ...}. Safe to call from several
  processes at once: each builds in its own temporary directory and the
  first to finish renames it into place.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  given = {k: v for k, v in (("seed", seed), ("scale", scale),
                             ("vocab_size", vocab_size)) if v is not None}
  settings = _settings(**dict(_DEFAULTS, **given))
  done_path = os.path.join(out_dir, DONE)

  def existing() -> dict[str, Any] | None:
    if not os.path.exists(done_path):
      return None
    with open(done_path, encoding="utf-8") as f:
      done = json.load(f)
    have = done.get("settings", {})
    # Settings not given explicitly accept whatever the corpus was built with.
    wanted = dict(settings, **{k: have.get(k) for k in _DEFAULTS
                               if k not in given})
    if have != wanted:
      raise ValueError(
          f"{out_dir} holds a demo corpus built with {have}, not {wanted}; "
          "delete it or choose another --out directory.")
    return done

  done = existing()
  if done is not None:
    return _result(out_dir, done)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ValueError(
        f"{out_dir} exists, is not empty and is not a finished demo corpus "
        f"(no {DONE} file); delete it or choose another directory.")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    done = _build(tmp, settings)
    with open(os.path.join(tmp, DONE), "w", encoding="utf-8") as f:
      json.dump(done, f, indent=1, sort_keys=True)
    try:
      if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # Empty (checked above); rename needs it gone.
      os.rename(tmp, out_dir)
    except OSError:
      # Another process finished first; use its corpus.
      if existing() is None:
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  if log:
    log(f"[demo_corpus] built {out_dir} in {done['build_seconds']} s")
  return _result(out_dir, existing())


def demo_domains(out_dir: str) -> list[dict[str, Any]]:
  """The data.domains list for the demo corpus in out_dir (equal weights)."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  return [{"name": name,
           "train": [os.path.join(out_dir, name, "train.jsonl")],
           "validation": [os.path.join(out_dir, name, "validation.jsonl")],
           "text_field": "text", "weight": 1.0}
          for name in DOMAINS]


def demo_data_config(out_dir: str, *, prepared_dir: str | None = None,
                     seq_len: int = 256):
  """A complete `data` config section for the demo corpus in out_dir.

  `prepare` builds the corpus first if needed (data.demo_corpus_dir).
  """
  from ddk_jax.data.config import default_data_config  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(os.fspath(out_dir))
  cfg = default_data_config()
  cfg.domains = demo_domains(out_dir)
  cfg.tokenizer = os.path.join(out_dir, "tokenizer")
  cfg.prepared_dir = prepared_dir or os.path.join(out_dir, "prepared")
  cfg.demo_corpus_dir = out_dir
  cfg.seq_len = seq_len
  cfg.docs_per_shard = 2000
  return cfg


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--seed", type=int, default=None, help="default 0")
  p.add_argument("--scale", type=float, default=None,
                 help="size multiplier (default 1.0: about 3 MB of text)")
  p.add_argument("--vocab_size", type=int, default=None, help="default 4096")
  args = p.parse_args(argv)
  info = ensure_demo_corpus(args.out, seed=args.seed, scale=args.scale,
                            vocab_size=args.vocab_size, log=print)
  for name, s in info["domains"].items():
    print(f"  {name:11s} train {s['train_documents']:5d} docs "
          f"{s['train_bytes'] / 1e3:7.0f} kB   validation "
          f"{s['validation_documents']:4d} docs")
  print(f"  tokenizer: {info['tokenizer']}")


if __name__ == "__main__":
  main()
