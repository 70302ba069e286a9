r"""The KD train step with a cached top-k teacher against the same step with the online teacher.

    .venv/bin/python benchmarks/teacher_cache_step.py                    # tiny and demo shapes
    .venv/bin/python benchmarks/teacher_cache_step.py --presets demo --top_k 64,4096

The steps are `ddk_jax.train_step.make_train_step` + `jit_train_step` on a one-device mesh, with
the run's default loss (chunked forward KL, T = 1): `online` runs the frozen teacher's forward and
its head matmuls in the step; `cache k=K` reads the teacher's top-K log-probabilities (float16),
ids and tail log-mass from the batch (`teacher.source='cache'`), made once from the same teacher
on the same rows; `none (cpt)` is the student's step without a KD term, the floor. Shapes are
the tiny test run's (tests/tiny_run.py) and the demo's (configs/demo.py); weights are random, fp32
on CPU (compute_dtype 'auto').

Timing: every step is compiled and warmed up first, then `--rounds` rounds run `--steps` timed
steps of each variant in turn, so load from other processes hits them alike; the step time is
the median over all timed steps. The host-side cost of a cached step (reading and decoding the
rows' cache records) is timed separately per row (`read ms/row`), from a cache file written here.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (layers, hidden, heads, kv_heads, intermediate) of teacher and student, vocab, seq_len, batch.
PRESETS = {
    "tiny": dict(teacher=(2, 32, 2, 2, 64), student=(1, 32, 2, 1, 64), vocab=400, seq=32, batch=8),
    "demo": dict(teacher=(3, 192, 4, 4, 512), student=(2, 96, 4, 2, 256), vocab=4096, seq=128, batch=16),
}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _model(shape, vocab):
  from ddk_jax.model import ModelConfig
  layers, hidden, heads, kv, inter = shape
  return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, param_dtype="float32", compute_dtype="auto")


def _batch(vocab, seq, batch, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)), "domain_id": np.zeros(batch, np.int32)}


def bench(name, p, top_ks, steps, rounds, warmup):
  import jax
  import numpy as np
  import optax
  from ddk_jax import sharding, teacher_cache, train_step as ts
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  tcfg, scfg = _model(p["teacher"], p["vocab"]), _model(p["student"], p["vocab"])
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
  s_sh, t_sh = ts.params_shardings(scfg, mesh, rules), ts.params_shardings(tcfg, mesh, rules)
  teacher = ts.init_params_sharded(tcfg, jax.random.key(1), t_sh)
  host = _batch(p["vocab"], p["seq"], p["batch"])
  variants = {}

  def make(cache: bool, mode: str = "kd"):
    params = ts.init_params_sharded(scfg, jax.random.key(0), s_sh)
    state_sh = ts.state_shardings(s_sh, opt, params, mesh)
    state = jax.jit(lambda q: ts.init_train_state(q, opt), out_shardings=state_sh)(params)
    opts = ts.StepOptions(num_domains=1, mode=mode, teacher_cache=cache)
    online = mode != "cpt" and not cache
    step = ts.jit_train_step(ts.make_train_step(scfg, tcfg if online else None, opt, opts), state_sh,
                             t_sh if online else None, mesh, rules, teacher_cache=cache)
    return [state, step]

  variants["online"] = make(False) + [teacher, sharding.host_batch_to_global(host, mesh, rules)]
  reads = {}
  for k in top_ks:
    out = jax.device_get(teacher_cache.topk_fn(tcfg, k, p["vocab"])(teacher, host))
    ids_dtype = "uint16" if p["vocab"] <= 2**16 else "uint32"
    cached = dict(host, cache_row=np.arange(p["batch"], dtype=np.int32), teacher_ids=out["ids"].astype(ids_dtype),
                  teacher_logp=out["logp"].astype(np.float16), teacher_tail=out["tail"].astype(np.float16),
                  teacher_target=out["target"].astype(np.float16))
    variants[f"cache k={k}"] = make(True) + [None, sharding.host_batch_to_global(cached, mesh, rules)]
    reads[f"cache k={k}"] = _read_cost(p, k, out)
  # The floor: the student's step without any KD term (mode cpt).
  variants["none (cpt, no KD)"] = make(False, mode="cpt") + [None, sharding.host_batch_to_global(host, mesh, rules)]
  times = {v: [] for v in variants}
  for v, (state, step, tp, batch) in variants.items():
    for _ in range(warmup):
      state, m = step(state, tp, batch)
    jax.block_until_ready(m)
    variants[v][0] = state
  for r in range(rounds):
    order = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
    for v in order:
      state, step, tp, batch = variants[v]
      for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, tp, batch)
        jax.block_until_ready(m)
        times[v].append(time.perf_counter() - t)
      variants[v][0] = state
  base = statistics.median(times["online"])
  rows = []
  for v, ts_ in times.items():
    med = statistics.median(ts_)
    rows.append((name, v, med * 1e3, med / base, reads.get(v)))
  return rows


def _read_cost(p, k, out) -> float:
  """Milliseconds to read and decode one row's record from an ArrayRecord file (host side)."""
  import numpy as np
  from array_record.python import array_record_module
  from ddk_jax.teacher_cache import RecordLayout
  layout = RecordLayout(seq_len=p["seq"], top_k=k, id_dtype="uint16", dtype="float16")
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "rows.array_record")
    w = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
    for j in range(p["batch"]):
      w.write(layout.encode(0, out["ids"][j], out["logp"][j], out["tail"][j], out["target"][j]))
    w.close()
    r = array_record_module.ArrayRecordReader(path)
    n = 0
    t = time.perf_counter()
    while time.perf_counter() - t < 0.5:
      for j in range(p["batch"]):
        _, ids, logp, tail, _ = layout.decode(r.read([j])[0])
        np.stack([ids, ids])  # the batch is stacked from the rows
        n += 1
    return (time.perf_counter() - t) / n * 1e3


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--presets", default="tiny,demo")
  ap.add_argument("--top_k", default="64", help="comma-separated k values (at most the preset's vocab)")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--warmup", type=int, default=2)
  args = ap.parse_args(argv)
  import jax
  rows = []
  for name in args.presets.split(","):
    p = PRESETS[name]
    ks = [min(int(k), p["vocab"]) for k in args.top_k.split(",")]
    rows += bench(name, p, ks, args.steps, args.rounds, args.warmup)
  print(f"processor: {_cpu_model()} ({os.cpu_count()} cores), JAX {jax.__version__} on "
        f"{jax.devices()[0].device_kind}; load average {os.getloadavg()[0]:.1f}")
  print("| shapes | teacher | step ms | vs online | read ms/row |")
  print("|---|---|---:|---:|---:|")
  for name, v, ms, ratio, read in rows:
    print(f"| {name} | {v} | {ms:.2f} | {ratio:.3f} ({1 / ratio:.2f}x faster) | "
          f"{'-' if read is None else f'{read:.3f}'} |")


if __name__ == "__main__":
  main()
