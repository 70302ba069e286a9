r"""Preparation throughput: documents/s with 1 vs N worker processes, side by side.

    python benchmarks/prepare_throughput.py [--scale 2] [--workers N] [--docs_per_shard 250]

Builds (or reuses) the demo corpus at `--scale` (about 2.5 MB of train text per unit), then prepares it
from scratch into fresh directories with data.num_prepare_workers = 1 (tokenizing in the prepare process;
the Rust tokenizer spreads each batch over every core) and = N (default: one worker process per usable
core), and, as a one-core reference, = 1 with the tokenizer's thread pool off (TOKENIZERS_PARALLELISM=false).
The three alternate `--repeats` times; it prints the best time of each, the ratios and the processor.
Times cover the whole `prepare` call: reading the sources, starting the worker processes, tokenizing,
writing shards and manifest. It also checks that 1 and N workers give the same bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddk_jax.data import prepare  # noqa: E402
from ddk_jax.demo import corpus as demo_corpus  # noqa: E402


def processor() -> str:
  """CPU model, vector extensions and usable cores, from /proc/cpuinfo."""
  model, flags = "unknown", set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  ext = ", ".join(x for x in ("avx512f", "avx2") if x in flags) or "no AVX2/AVX-512"
  return f"{model} ({ext}), {prepare._usable_cpus()} usable cores"  # pylint: disable=protected-access


def _files(directory: str) -> dict[str, bytes]:
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return out


def measure(cfg, workers: int, out_dir: str, *, tokenizer_threads: bool = True) -> tuple[float, dict]:
  """Seconds of one fresh `prepare` with `workers` worker processes, and its manifest."""
  shutil.rmtree(out_dir, ignore_errors=True)
  cfg.prepared_dir = out_dir
  cfg.num_prepare_workers = workers
  saved = os.environ.get("TOKENIZERS_PARALLELISM")
  if not tokenizer_threads:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
  try:
    t0 = time.perf_counter()
    manifest = prepare.prepare(cfg, progress=False, log=None)
    return time.perf_counter() - t0, manifest
  finally:
    if saved is None:
      os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
      os.environ["TOKENIZERS_PARALLELISM"] = saved


def main(argv: list[str] | None = None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--corpus_dir", default=None, help="default: a temporary directory per scale")
  p.add_argument("--scale", type=float, default=2.0, help="demo corpus size (1.0: about 2.5 MB of train text)")
  p.add_argument("--workers", type=int, default=0, help="N >= 2 (default: one per usable core, at least 2)")
  p.add_argument("--docs_per_shard", type=int, default=250)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args(argv)

  n = args.workers or max(2, prepare._usable_cpus())  # pylint: disable=protected-access
  if n < 2:
    p.error("--workers must be at least 2 (1 is always measured)")
  corpus_dir = args.corpus_dir or os.path.join(tempfile.gettempdir(), f"ddk_jax_demo_corpus_x{args.scale:g}")
  t0 = time.perf_counter()
  info = demo_corpus.ensure_demo_corpus(corpus_dir, scale=args.scale)
  cfg = demo_corpus.demo_data_config(corpus_dir)
  cfg.demo_corpus_dir = None
  cfg.docs_per_shard = args.docs_per_shard
  mb = sum(d["train_bytes"] for d in info["domains"].values()) / 1e6
  print(f"demo corpus (scale {args.scale:g}, {mb:.1f} MB of train text) ready in "
        f"{time.perf_counter() - t0:.1f} s: {corpus_dir}")

  runs = {"1, one thread": (1, False), "1": (1, True), str(n): (n, True)}
  best = dict.fromkeys(runs, float("inf"))
  manifests = {}
  with tempfile.TemporaryDirectory() as tmp:
    outs = {name: os.path.join(tmp, f"run{i}") for i, name in enumerate(runs)}
    for _ in range(args.repeats):
      for name, (w, threads) in runs.items():
        seconds, manifests[name] = measure(cfg, w, outs[name], tokenizer_threads=threads)
        best[name] = min(best[name], seconds)
    same = _files(outs["1"]) == _files(outs[str(n)])
  m = manifests["1"]
  docs = sum(e[s]["documents"] + e[s]["skipped_empty"] for e in m["domains"].values()
             for s in ("train", "validation"))
  tokens = sum(e[s]["tokens"] for e in m["domains"].values() for s in ("train", "validation"))
  shards = sum(len(e[s]["shards"]) for e in m["domains"].values() for s in ("train", "validation"))
  print(f"processor: {processor()}")
  print(f"{docs} documents, {tokens:,} tokens, {shards} shards of <= {args.docs_per_shard} documents; "
        f"best of {args.repeats}")
  print(f"{'workers':>14} {'seconds':>8} {'docs/s':>9} {'tokens/s':>11}")
  for name in runs:
    print(f"{name:>14} {best[name]:>8.2f} {docs / best[name]:>9,.0f} {tokens / best[name]:>11,.0f}")
  ratio = best["1"] / best[str(n)]
  print(f"ratio {n} workers / 1: {ratio:.2f}x documents/s; {n} workers / 1 with one thread: "
        f"{best['1, one thread'] / best[str(n)]:.2f}x; same bytes: {'yes' if same else 'NO'}")
  return {"docs_per_s_1": docs / best["1"], f"docs_per_s_{n}": docs / best[str(n)], "ratio": ratio,
          "same_bytes": float(same)}


if __name__ == "__main__":
  main()
