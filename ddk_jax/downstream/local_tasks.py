"""Multiple-choice tasks over the demo corpus's validation documents, one per domain.

    python -m ddk_jax.downstream.local_tasks --out DIR [--corpus DIR] [--seed 0]

Built from `<corpus>/<domain>/validation.jsonl` (held out from training, so the student
has not seen these documents), deterministically for a given corpus and settings.  Each
item is `{"context", "choices" (4), "label"}`; the model picks the choice with the
highest log-likelihood after the context (`acc`; `acc_norm` divides by the choice's
length in bytes).  The distractors are always real text of the same domain, so only
knowing the document tells them apart:

  ddk_records     the real next line of a JSON / CSV record file; distractors: lines of
                  other files of the same format with a different key (JSON) or record id
                  (CSV), so field order and consecutive ids decide
  ddk_math        the final number of a worked arithmetic / algebra problem (for
                  equations: the solution, the check line dropped); distractors: nearby
                  numbers (+-1, +-2, +-10, ..., digits swapped) with the same sign
  ddk_code        the real next line of a Python file; distractors: lines of other files
  ddk_docstrings  the real next sentence of a docstring (after a sentence or a paragraph
                  break); distractors: sentences of other docstrings of similar length
  ddk_prose       the real next sentence of a language-reference passage; distractors:
                  sentences of other passages of similar length

Contexts are at most `max_context_chars` (default 300) and choices `max_choice_chars`
(120): with the demo's 4k tokenizer an item is 50-115 tokens on average (records are the
densest), about the demo's 128-token training rows; raise both for models trained on
longer rows.  The first ~15% of each domain's validation documents give
the few-shot pool (`fewshot.jsonl`), the rest the test items (`test.jsonl`, at most
`max_items`).

DIR gets `<task>/test.jsonl`, `<task>/fewshot.jsonl`, `<task>.yaml` (an lm-eval task
config, usable with `lm_eval --include_path DIR --tasks ddk_math ...`; it names the data
files by absolute path) and `MANIFEST.json` (settings, counts, sha256 of every data file).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import random
import re
import zlib
from typing import Any, Callable

from ddk_jax.demo.corpus import DOMAINS

VERSION = 1
TAG = "ddk_local"  # every local task carries this tag: `--tasks ddk_local` runs them all
TASKS = {f"ddk_{d}": d for d in DOMAINS}  # task name -> demo corpus domain
MANIFEST = "MANIFEST.json"
DEFAULTS = {"seed": 0, "max_items": 250, "max_context_chars": 300, "max_choice_chars": 120, "num_choices": 4,
            "fewshot_fraction": 0.15}
DEFAULT_CORPUS = os.environ.get("DDK_DEMO_CORPUS", os.path.join("runs", "demo_corpus"))

_MIN_LINE_CHARS = 6  # a next-line target has at least this many non-blank characters
_MIN_SENTENCE_CHARS = 20
_FEWSHOT_ITEMS = 25  # at most, per task


def _rng(task: str, seed: int, part: str) -> random.Random:
  return random.Random((int(seed) * 1_000_003) ^ zlib.crc32(f"{task}/{part}".encode()))


def _read_docs(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f if line.strip()]


def _context_before(text: str, end: int, max_chars: int, *, at_lines: bool) -> str:
  """The last <= max_chars characters of text[:end], starting at a line (or word) start."""
  ctx = text[:end]
  if len(ctx) <= max_chars:
    return ctx
  ctx = ctx[-max_chars:]
  cut = ctx.find("\n") if at_lines else -1
  if cut < 0 or cut > len(ctx) // 2:  # no line start near: start at a word instead
    cut = next((i for i, c in enumerate(ctx) if c.isspace()), -1)
  return ctx[cut + 1:] if 0 <= cut < len(ctx) - 1 else ctx


def _pick_distractors(rng: random.Random, pool: list[tuple[Any, str]], real: str, key: Any, n: int) -> list[str] | None:
  """n distinct texts from pool [(key, text)] whose key differs from `key` and text from `real`,
  preferring texts within +-50% of the real one's length."""
  ok = [t for k, t in pool if k != key and t.strip() != real.strip()]
  near = [t for t in ok if 0.5 * len(real) <= len(t) <= 1.5 * len(real)]
  out: list[str] = []
  for group in (near, ok):
    group = sorted(set(group) - set(out))
    rng.shuffle(group)
    out.extend(group[:n - len(out)])
    if len(out) == n:
      return out
  return None


def _item(rng: random.Random, context: str, real: str, distractors: list[str], where: str) -> dict[str, Any]:
  choices = distractors + [real]
  rng.shuffle(choices)
  return {"context": context, "choices": choices, "label": choices.index(real), "source": where}


# ------------------------------------------------------------------ next line --


# (group, key) of a candidate line: distractors come from the same group with another key.
def _records_key(doc: str, line: str) -> tuple[str, str]:
  if doc.lstrip().startswith("["):  # JSON records: the field name
    return ("json", line.split(":", 1)[0].strip())
  return ("csv", line.split(",", 1)[0])  # CSV: the record id


def _code_key(doc: str, line: str) -> tuple[str, str]:
  return ("python", line.strip())


def _line_targets(doc: str, max_choice: int) -> list[int]:
  lines = doc.split("\n")
  return [j for j in range(2, len(lines))  # at least two lines of context
          if len(lines[j].strip()) >= _MIN_LINE_CHARS and len(lines[j]) + 1 <= max_choice]


def _next_line_items(task: str, docs: list[tuple[int, str]], all_docs: list[tuple[int, str]], rng: random.Random,
                     settings: dict, per_doc: int, key_fn: Callable[[str, str], Any]) -> list[dict[str, Any]]:
  n_dis = settings["num_choices"] - 1
  pool = []  # (doc, key), "\n" + line
  for d, doc in all_docs:
    lines = doc.split("\n")
    for j in _line_targets(doc, settings["max_choice_chars"]):
      pool.append(((d, key_fn(doc, lines[j])), "\n" + lines[j]))
  items = []
  for d, doc in docs:
    lines = doc.split("\n")
    targets = _line_targets(doc, settings["max_choice_chars"])
    for j in sorted(rng.sample(targets, min(per_doc, len(targets)))):
      real = "\n" + lines[j]
      group, key = key_fn(doc, lines[j])
      # Distractors: lines of other documents of the same group (file format), never with the real line's key.
      candidates = [(k, t) for (dd, (g, k)), t in pool if dd != d and g == group]
      dis = _pick_distractors(rng, candidates, real, key, n_dis)
      if dis is None:
        continue
      end = sum(len(x) + 1 for x in lines[:j]) - 1  # the end of line j-1 (its newline belongs to the choice)
      context = _context_before(doc, end, settings["max_context_chars"], at_lines=True)
      items.append(_item(rng, context, real, dis, f"validation.jsonl:{d + 1}:line{j + 1}"))
  return items


# -------------------------------------------------------------- next sentence --

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")


def _sentences(doc: str, max_choice: int) -> list[tuple[int, int]]:
  """(start, end) spans of sentences that can be a target.  A span starts right after the end of a
  sentence or where a paragraph break begins (so it includes the whitespace before the sentence),
  and ends at the next sentence end; the sentence itself starts with a capital letter, has no
  blank line inside, has at least _MIN_SENTENCE_CHARS characters, and the span fits max_choice."""
  ends = [m.end() for m in _SENTENCE_END.finditer(doc)]
  starts = sorted(set(ends) | {m.start() for m in re.finditer(r"\n\n", doc)})
  spans = []
  for a in starts:
    k = bisect.bisect_right(ends, a)
    if a < 10 or k == len(ends):  # a context of a few characters only, or no sentence end after a
      continue
    b = ends[k]
    piece = doc[a:b]
    body = piece.lstrip()
    if (body[:1].isupper() and "\n\n" not in body and len(body) >= _MIN_SENTENCE_CHARS
        and len(piece) <= max_choice):
      spans.append((a, b))
  return spans


def _next_sentence_items(task: str, docs: list[tuple[int, str]], all_docs: list[tuple[int, str]], rng: random.Random,
                         settings: dict, per_doc: int) -> list[dict[str, Any]]:
  n_dis = settings["num_choices"] - 1
  pool = [(d, doc[a:b].lstrip()) for d, doc in all_docs for a, b in _sentences(doc, settings["max_choice_chars"])]
  items = []
  for d, doc in docs:
    spans = _sentences(doc, settings["max_choice_chars"])
    for a, b in sorted(rng.sample(spans, min(per_doc, len(spans)))):
      piece = doc[a:b]
      body = piece.lstrip()
      sep = piece[:len(piece) - len(body)]  # the real whitespace before the sentence, kept for every choice
      dis = _pick_distractors(rng, pool, body, d, n_dis)
      if dis is None:
        continue
      context = _context_before(doc, a, settings["max_context_chars"], at_lines=False)
      items.append(_item(rng, context, sep + body, [sep + t for t in dis], f"validation.jsonl:{d + 1}:char{a}"))
  return items


# ----------------------------------------------------------------------- math --

_PROBLEM = re.compile(r"(?:^|\n\n)(?=Problem \d+\. )")
_NUMBER = re.compile(r"-?\d+")


def _nearby_numbers(rng: random.Random, n: int, count: int) -> list[int]:
  deltas = [1, -1, 2, -2, 10, -10, 100, -100, 3, -3, 5, -5, 20, -20]
  cands = {n + d for d in deltas}
  digits = str(abs(n))
  if len(digits) >= 2:  # two neighbouring digits swapped
    i = rng.randrange(len(digits) - 1)
    swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:]
    cands.add(int(swapped) * (-1 if n < 0 else 1))
  cands = sorted(c for c in cands if c != n and (c >= 0) == (n >= 0) and len(str(abs(c))) <= len(digits) + 1)
  rng.shuffle(cands)
  # The closest candidates first (+-1, +-2 and the swap are the hard ones), then the rest.
  cands.sort(key=lambda c: min(abs(c - n), 3))
  return cands[:count]


def _math_items(task: str, docs: list[tuple[int, str]], rng: random.Random, settings: dict,
                per_doc: int) -> list[dict[str, Any]]:
  items = []
  for d, doc in docs:
    problems = [p for p in _PROBLEM.split(doc) if p.strip()]
    for k in sorted(rng.sample(range(len(problems)), min(per_doc, len(problems)))):
      text = problems[k].strip("\n")
      if "\nCheck: " in text:  # equations: the answer is the solution, not the restated constant
        text = text[:text.index("\nCheck: ")]
      numbers = list(_NUMBER.finditer(text))
      if not numbers:
        continue
      m = numbers[-1]
      value, suffix = int(m.group()), text[m.end():]
      context = text[:m.start()]
      sep = " " if context.endswith(" ") else ""
      context = context.rstrip(" ")
      if len(context) > settings["max_context_chars"]:
        context = _context_before(context, len(context), settings["max_context_chars"], at_lines=True)
      wrong = _nearby_numbers(rng, value, settings["num_choices"] - 1)
      if len(wrong) < settings["num_choices"] - 1:
        continue
      items.append(_item(rng, context, f"{sep}{value}{suffix}", [f"{sep}{w}{suffix}" for w in wrong],
                         f"validation.jsonl:{d + 1}:problem{k + 1}"))
  return items


# ---------------------------------------------------------------------- build --


def _build_task(task: str, docs: list[str], settings: dict) -> tuple[list[dict], list[dict]]:
  domain = TASKS[task]
  n_few = max(1, round(len(docs) * settings["fewshot_fraction"]))
  if len(docs) < n_few + 2:
    raise ValueError(f"{domain}: {len(docs)} validation documents are too few for a task (need >= {n_few + 2})")
  everything = list(enumerate(docs))
  groups = {"fewshot": everything[:n_few], "test": everything[n_few:]}
  out = {}
  for part, group in groups.items():
    rng = _rng(task, settings["seed"], part)
    cap = settings["max_items"] if part == "test" else _FEWSHOT_ITEMS
    # Enough items per document to reach the cap, spread over all documents.
    per_doc = max(1, -(-cap // len(group)))
    if domain == "math":
      items = _math_items(task, group, rng, settings, per_doc)
    elif domain in ("prose", "docstrings"):
      items = _next_sentence_items(task, group, everything, rng, settings, per_doc)
    else:
      key_fn = _records_key if domain == "records" else _code_key
      items = _next_line_items(task, group, everything, rng, settings, per_doc, key_fn)
    # An item whose distractor also continues the context somewhere in the domain (a header line
    # shared by several chunks of one file, a repeated sentence) has two right answers: dropped.
    items = [it for it in items if not any(it["context"] + c in doc for k, c in enumerate(it["choices"])
                                           if k != it["label"] for doc in docs)]
    if len(items) > cap:
      keep = sorted(rng.sample(range(len(items)), cap))
      items = [items[i] for i in keep]
    if not items:
      raise ValueError(f"{domain}: no {part} items could be built from {len(group)} documents")
    out[part] = [dict(id=f"{task}/{part}/{i}", **it) for i, it in enumerate(items)]
  return out["test"], out["fewshot"]


def task_config(task: str, task_dir: str) -> dict[str, Any]:
  """The lm-eval task config of a generated local task (data files by absolute path)."""
  root = os.path.abspath(os.fspath(task_dir))
  return {
      "task": task,
      "tag": [TAG],
      "dataset_path": "json",
      # The datasets library's Arrow cache of the files stays beside them.
      "dataset_kwargs": {"data_files": {"test": os.path.join(root, task, "test.jsonl"),
                                        "train": os.path.join(root, task, "fewshot.jsonl")},
                         "cache_dir": os.path.join(root, ".datasets_cache")},
      "test_split": "test",
      "fewshot_split": "train",
      "output_type": "multiple_choice",
      "doc_to_text": "context",
      "doc_to_choice": "choices",
      "doc_to_target": "label",
      "target_delimiter": "",
      "fewshot_delimiter": "\n\n",
      "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                      {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
      "metadata": {"version": float(VERSION)},
  }


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _write_jsonl(path: str, rows: list[dict]) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _corpus_fingerprint(corpus_dir: str) -> dict[str, str]:
  return {d: _sha256(os.path.join(corpus_dir, d, "validation.jsonl")) for d in DOMAINS}


def generate_local_tasks(out_dir: str, corpus_dir: str | None = None, *, tasks: list[str] | None = None,
                         log: Callable[[str], None] | None = None, **settings: Any) -> dict[str, Any]:
  """Builds the local tasks in out_dir from the corpus's validation documents; returns the manifest.

  `corpus_dir` defaults to `runs/demo_corpus` ($DDK_DEMO_CORPUS), built first when absent
  (`ddk_jax.demo.corpus.ensure_demo_corpus`).  `settings` override DEFAULTS.
  """
  unknown = sorted(set(settings) - set(DEFAULTS))
  if unknown:
    raise TypeError(f"unknown local task settings {unknown}; valid: {sorted(DEFAULTS)}")
  settings = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
  if settings["num_choices"] < 2 or settings["max_items"] < 1:
    raise ValueError("num_choices must be >= 2 and max_items >= 1")
  tasks = list(TASKS) if not tasks else list(tasks)
  bad = [t for t in tasks if t not in TASKS]
  if bad:
    raise ValueError(f"unknown local tasks {bad}; available: {sorted(TASKS)}")
  corpus_dir = os.path.abspath(os.fspath(corpus_dir or DEFAULT_CORPUS))
  if not all(os.path.isfile(os.path.join(corpus_dir, TASKS[t], "validation.jsonl")) for t in tasks):
    from ddk_jax.demo.corpus import ensure_demo_corpus
    ensure_demo_corpus(corpus_dir, log=log)
  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  import yaml
  manifest: dict[str, Any] = {"version": VERSION, "settings": settings, "corpus": corpus_dir,
                              "corpus_validation_sha256": _corpus_fingerprint(corpus_dir), "tasks": {}}
  for task in tasks:
    docs = _read_docs(os.path.join(corpus_dir, TASKS[task], "validation.jsonl"))
    test, few = _build_task(task, docs, settings)
    os.makedirs(os.path.join(out_dir, task), exist_ok=True)
    files = {}
    for part, rows in (("test", test), ("fewshot", few)):
      path = os.path.join(out_dir, task, f"{part}.jsonl")
      _write_jsonl(path, rows)
      files[f"{part}.jsonl"] = _sha256(path)
    with open(os.path.join(out_dir, f"{task}.yaml"), "w", encoding="utf-8") as f:
      yaml.safe_dump(task_config(task, out_dir), f, sort_keys=False, allow_unicode=True)
    manifest["tasks"][task] = {"domain": TASKS[task], "test_items": len(test), "fewshot_items": len(few),
                               "sha256": files}
    if log:
      log(f"  {task:15s} {len(test):4d} test items, {len(few):3d} few-shot items")
  tmp = os.path.join(out_dir, f"{MANIFEST}.tmp-{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(out_dir, MANIFEST))
  return manifest


def ensure_local_tasks(out_dir: str, corpus_dir: str | None = None, *, tasks: list[str] | None = None,
                       log: Callable[[str], None] | None = None, **settings: Any) -> dict[str, Any]:
  """The manifest of out_dir's local tasks, generating them first unless they are there for
  the same settings and the same corpus validation files.  Without `corpus_dir`, tasks are
  regenerated from the corpus the manifest names when it still exists."""
  path = os.path.join(os.fspath(out_dir), MANIFEST)
  wanted = list(TASKS) if not tasks else list(tasks)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      have = json.load(f)
    if corpus_dir is None and os.path.isdir(have.get("corpus", "")):
      corpus_dir = have["corpus"]
    same = (have.get("version") == VERSION
            and have.get("settings") == {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
            and all(t in have.get("tasks", {}) for t in wanted))
    if same and corpus_dir is not None:
      corpus = os.path.abspath(os.fspath(corpus_dir))
      same = os.path.isdir(corpus) and have.get("corpus_validation_sha256") == _corpus_fingerprint(corpus)
    if same and all(os.path.isfile(os.path.join(out_dir, t, "test.jsonl")) for t in wanted):
      return have
  return generate_local_tasks(out_dir, corpus_dir, tasks=tasks, log=log, **settings)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True, help="output directory for the task files")
  p.add_argument("--corpus", default=None,
                 help=f"demo corpus directory (default {DEFAULT_CORPUS}, built when absent)")
  p.add_argument("--tasks", default="", help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
  for key, value in DEFAULTS.items():
    p.add_argument(f"--{key}", type=type(value), default=None, help=f"default {value}")
  args = p.parse_args(argv)
  settings = {k: getattr(args, k) for k in DEFAULTS}
  tasks = [t for t in args.tasks.split(",") if t] or None
  manifest = generate_local_tasks(args.out, args.corpus, tasks=tasks, log=print, **settings)
  print(f"wrote {len(manifest['tasks'])} tasks to {os.path.abspath(args.out)} (from {manifest['corpus']})")


if __name__ == "__main__":
  main()
