"""Peak memory and time of the naive vs chunked CE + KD loss, forward plus backward.

For each vocabulary size it builds ``value_and_grad`` (w.r.t. the student hidden
states and head) of ``loss = (sum(ce) + gamma * sum(kl)) / count`` with three
implementations, all measured in the same run:

* ``naive``        ``losses.kd_token_losses``: full fp32 [tokens, V] logits.
* ``chunked``      ``chunked_loss.chunked_kd_token_losses``: per-token outputs,
                   backward recomputes the logits chunk by chunk.
* ``chunked_sum``  ``chunked_loss.chunked_kd_loss_sum``: scalar training form,
                   gradient computed in the forward pass (no recompute).

Peak memory comes from XLA's buffer assignment of the compiled executable
(``memory_analysis()``: arguments + outputs + temporaries - aliased), so it
needs no execution and is reported for every configuration, including ones
that would not fit in this machine's RAM. Wall time (median of ``--repeats``
runs after one warm-up run) is measured only where running is feasible:
by default for every vocabulary whose naive peak fits in ``--max-run-gib``.

    .venv/bin/python benchmarks/loss_memory.py                 # the issue's settings
    .venv/bin/python benchmarks/loss_memory.py --tokens 2048 --vocabs 32768 --repeats 2
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ddk_jax import chunked_loss, losses  # noqa: E402

IMPLS = ("naive", "chunked", "chunked_sum")
MiB = 2**20


def make_loss(impl: str, temperature: float, gamma: float, chunk_size: int | None):
  def loss(hs, ws, ht, wt, targets, mask):
    count = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    if impl == "chunked_sum":
      total, _ = chunked_loss.chunked_kd_loss_sum(
        hs, ws, ht, wt, targets, mask, temperature=temperature, gamma=gamma,
        chunk_size=chunk_size)
      return total / count
    if impl == "naive":
      ce, kl = losses.kd_token_losses(hs, ws, ht, wt, targets, mask, temperature=temperature)
    else:
      ce, kl = chunked_loss.chunked_kd_token_losses(
        hs, ws, ht, wt, targets, mask, temperature=temperature, chunk_size=chunk_size)
    return (jnp.sum(ce) + gamma * jnp.sum(kl)) / count

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def input_specs(batch, seq, h_s, h_t, vocab, dtype):
  sd = jax.ShapeDtypeStruct
  return (sd((batch, seq, h_s), dtype), sd((h_s, vocab), dtype),
          sd((batch, seq, h_t), dtype), sd((h_t, vocab), dtype),
          sd((batch, seq), jnp.int32), sd((batch, seq), jnp.bool_))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def make_inputs(batch, seq, h_s, h_t, vocab, dtype):
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  hs = jax.random.normal(k[0], (batch, seq, h_s), dtype)
  ht = jax.random.normal(k[1], (batch, seq, h_t), dtype)
  ws = (jax.random.normal(k[2], (h_s, vocab)) * (2 / h_s**0.5)).astype(dtype)
  wt = (jax.random.normal(k[3], (h_t, vocab)) * (2 / h_t**0.5)).astype(dtype)
  targets = jax.random.randint(k[4], (batch, seq), 0, vocab)
  # ~6% padding at the end of each row, like a packed batch's tail.
  mask = jnp.arange(seq)[None, :] < jnp.full((batch, 1), seq - seq // 16)
  return hs, ws, ht, wt, targets, mask


def peak_bytes(compiled) -> dict:
  ma = compiled.memory_analysis()
  out = {
    "args": ma.argument_size_in_bytes,
    "out": ma.output_size_in_bytes,
    "temp": ma.temp_size_in_bytes,
    "alias": ma.alias_size_in_bytes,
  }
  out["peak"] = out["args"] + out["out"] + out["temp"] - out["alias"]
  return out


def time_runs(compiled: dict, args, repeats: int) -> dict:
  """Median wall time per implementation; rounds interleave them so load drift hits all alike."""
  for c in compiled.values():
    jax.block_until_ready(c(*args))  # warm-up: first touch of the buffers
  times = {k: [] for k in compiled}
  for _ in range(repeats):
    for k, c in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(*args))
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (B * S)")
  p.add_argument("--batch", type=int, default=4, help="rows B; S = tokens / B")
  p.add_argument("--vocabs", default="32768,151936", help="comma-separated vocab sizes")
  p.add_argument("--student-hidden", type=int, default=1024)
  p.add_argument("--teacher-hidden", type=int, default=1024)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="dtype of hidden states and heads (softmax is fp32 either way)")
  p.add_argument("--temperature", type=float, default=2.0)
  p.add_argument("--gamma", type=float, default=0.5)
  p.add_argument("--chunk-size", type=int, default=0, help="0: default_chunk_size(V)")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--repeats", type=int, default=2, help="timed runs (median) after a warm-up")
  p.add_argument("--time", choices=("feasible", "all", "none"), default="feasible",
                 help="feasible: time a vocab only if its naive peak fits in --max-run-gib")
  p.add_argument("--max-run-gib", type=float, default=None,
                 help="default: 60%% of physical memory")
  args = p.parse_args(argv)

  if args.tokens % args.batch:
    p.error("--tokens must be a multiple of --batch")
  seq = args.tokens // args.batch
  dtype = jnp.dtype(args.dtype)
  impls = [s.strip() for s in args.impls.split(",") if s.strip()]
  vocabs = [int(v) for v in args.vocabs.split(",")]
  max_run = args.max_run_gib
  if max_run is None:
    max_run = 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30

  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus); "
        f"tokens {args.tokens} (B={args.batch}, S={seq}), student H={args.student_hidden}, "
        f"teacher H={args.teacher_hidden}, {args.dtype} hidden/heads, T={args.temperature}, "
        f"gamma={args.gamma}; value_and_grad w.r.t. student hidden and head; "
        f"load average {os.getloadavg()[0]:.1f}", flush=True)

  rows = []
  for vocab in vocabs:
    chunk = args.chunk_size or chunked_loss.default_chunk_size(vocab)
    specs = input_specs(args.batch, seq, args.student_hidden, args.teacher_hidden, vocab, dtype)
    compiled = {}
    for impl in impls:
      fn = make_loss(impl, args.temperature, args.gamma, chunk)
      compiled[impl] = fn.lower(*specs).compile()
    mem = {impl: peak_bytes(c) for impl, c in compiled.items()}
    naive_peak = mem.get("naive", {}).get("peak", 0)
    run = args.time == "all" or (args.time == "feasible" and naive_peak <= max_run * 2**30)
    times = {}
    if run:
      inputs = make_inputs(args.batch, seq, args.student_hidden, args.teacher_hidden, vocab, dtype)
      times = time_runs(compiled, inputs, args.repeats)
      print(f"  V={vocab}: " + ", ".join(f"{k} {t:.2f} s" for k, t in times.items()), flush=True)
      del inputs
    for impl in impls:
      rows.append(dict(vocab=vocab, impl=impl, chunk=None if impl == "naive" else chunk,
                       time=times.get(impl), **mem[impl]))
    compiled.clear()

  print()
  hdr = ("| vocab | impl | chunk | args MiB | out MiB | temp MiB | peak MiB | peak vs naive "
         "| time s | time vs naive |")
  print(hdr)
  print("|---" * (hdr.count("|") - 1) + "|")
  base = {r["vocab"]: r for r in rows if r["impl"] == "naive"}
  verdicts = []
  for r in rows:
    b = base.get(r["vocab"])
    pr = r["peak"] / b["peak"] if b else float("nan")
    tr = r["time"] / b["time"] if b and r["time"] and b["time"] else None
    print(f"| {r['vocab']} | {r['impl']} | {r['chunk'] or '-'} | {r['args'] / MiB:,.0f} "
          f"| {r['out'] / MiB:,.0f} | {r['temp'] / MiB:,.0f} | {r['peak'] / MiB:,.0f} "
          f"| {f'{pr:.3f} (1/{1 / pr:.1f})' if b else '-'} "
          f"| {'%.2f' % r['time'] if r['time'] else 'not run'} "
          f"| {'%.2fx' % tr if tr else '-'} |")
    if b and r["impl"] != "naive":
      goal = 1 / 4 if r["vocab"] <= 65536 else 1 / 8
      verdicts.append(f"V={r['vocab']} {r['impl']}: peak {pr:.3f} of naive "
                      f"(goal <= {goal:.3f}: {'PASS' if pr <= goal else 'FAIL'})"
                      + (f"; time {tr:.2f}x naive (goal <= 1.2x: "
                         f"{'PASS' if tr <= 1.2 else 'FAIL'})" if tr else ""))
  print()
  for v in verdicts:
    print(v)
  print(f"load average at the end {os.getloadavg()[0]:.1f} (timings are shared-CPU wall times)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
