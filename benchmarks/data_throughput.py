r"""Throughput of the data pipeline (train mixture) on the demo corpus.

    python benchmarks/data_throughput.py [--seq_len 512] [--batch_size 8]

Builds (or reuses) the demo corpus and its prepared shards, then measures how
many tokens per second the train mixture hands to a consumer that stacks
`batch_size` rows per step, as the training loop does. The mixture weights
are changed before every batch (as if the DDK interval were one step), so the
figure includes that cost. In the same run it measures the demo config's
train step (teacher + student of configs/demo.py, random weights, one device)
on batches of the same shape and prints the ratio: the pipeline must be at
least 10x faster than training consumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddk_jax.demo import corpus as demo_corpus  # pylint: disable=g-import-not-at-top
from ddk_jax.data import pipeline
from ddk_jax.data import prepare


def measure_pipeline_tokens_per_s(data_cfg: Any, *, batch_size: int,
                                  num_batches: int, warmup_batches: int = 5,
                                  change_weights: bool = True
                                  ) -> dict[str, float]:
  """Tokens/s (all row positions and loss tokens) of the train mixture."""
  it = pipeline.build_train_iterator(data_cfg, process_index=0,
                                     process_count=1)
  n = len(it.domain_names)
  for _ in range(warmup_batches):
    it.next_batch(batch_size)
  loss_tokens = 0
  t0 = time.perf_counter()
  for step in range(num_batches):
    if change_weights:
      it.set_weights([1.0 + ((step + i) % n) for i in range(n)])
    batch = it.next_batch(batch_size)
    loss_tokens += int((batch["segment_ids"] > 0).sum())
  seconds = time.perf_counter() - t0
  tokens = num_batches * batch_size * int(data_cfg.seq_len)
  t1 = time.perf_counter()
  it.get_state()
  state_ms = (time.perf_counter() - t1) * 1e3
  return {"tokens_per_s": tokens / seconds,
          "loss_tokens_per_s": loss_tokens / seconds,
          "batches_per_s": num_batches / seconds,
          "get_state_ms": state_ms}


def measure_train_step_tokens_per_s(data_cfg: Any, *, batch_size: int,
                                    num_steps: int = 10) -> float:
  """Tokens/s of the demo config's jitted KD step on real pipeline batches."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ddk_jax import config_validation, optim, sharding  # pylint: disable=g-import-not-at-top
  from ddk_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "demo", os.path.join(root, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  student = config_validation.model_config(cfg, "student")
  teacher = config_validation.model_config(cfg, "teacher")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                            devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  optimizer = optim.make_optimizer(cfg.optimizer, 1000)
  opts = ts.StepOptions(num_domains=len(data_cfg.domains), mode="ddk")
  s_sh = ts.params_shardings(student, mesh, rules)
  t_sh = ts.params_shardings(teacher, mesh, rules)
  params = ts.init_params_sharded(student, jax.random.key(0), s_sh)
  teacher_params = ts.init_params_sharded(teacher, jax.random.key(1), t_sh)
  state_sh = ts.state_shardings(s_sh, optimizer, params, mesh)
  state = jax.jit(lambda p: ts.init_train_state(p, optimizer),
                  out_shardings=state_sh)(params)
  step = ts.jit_train_step(
      ts.make_train_step(student, teacher, optimizer, opts), state_sh, t_sh,
      mesh, rules)
  it = pipeline.build_train_iterator(data_cfg, process_index=0,
                                     process_count=1)
  batches = [sharding.host_batch_to_global(it.next_batch(batch_size), mesh,
                                           rules) for _ in range(num_steps + 2)]
  for b in batches[:2]:  # compile + warm up
    state, m = step(state, teacher_params, b)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for b in batches[2:]:
    state, m = step(state, teacher_params, b)
  jax.block_until_ready(m)
  return num_steps * batch_size * int(data_cfg.seq_len) / (
      time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--corpus_dir", default=os.path.join(
      tempfile.gettempdir(), "ddk_jax_demo_corpus"))
  p.add_argument("--seq_len", type=int, default=256,
                 help="default: the demo config's")
  p.add_argument("--batch_size", type=int, default=16,
                 help="default: the demo config's global batch")
  p.add_argument("--train_steps", type=int, default=10)
  p.add_argument("--num_batches", type=int, default=100)
  p.add_argument("--num_threads", type=int, default=None,
                 help="reader threads per domain (default: config default)")
  args = p.parse_args(argv)

  t0 = time.perf_counter()
  demo_corpus.ensure_demo_corpus(args.corpus_dir)
  cfg = demo_corpus.demo_data_config(args.corpus_dir, seq_len=args.seq_len)
  if args.num_threads is not None:
    cfg.num_threads = args.num_threads
  prepare.ensure_prepared(cfg)
  print(f"demo corpus + preparation ready in {time.perf_counter() - t0:.1f} s "
        f"({args.corpus_dir})")
  r = measure_pipeline_tokens_per_s(cfg, batch_size=args.batch_size,
                                    num_batches=args.num_batches)
  print(f"pipeline: {r['tokens_per_s']:,.0f} tokens/s "
        f"({r['loss_tokens_per_s']:,.0f} loss tokens/s, "
        f"{r['batches_per_s']:.1f} batches/s of {args.batch_size} x "
        f"{args.seq_len}; get_state {r['get_state_ms']:.2f} ms)")
  train = measure_train_step_tokens_per_s(cfg, batch_size=args.batch_size,
                                          num_steps=args.train_steps)
  ratio = r["tokens_per_s"] / train
  print(f"demo train step: {train:,.0f} tokens/s")
  print(f"ratio pipeline / train step: {ratio:.1f}x "
        f"({'meets' if ratio >= 10 else 'MISSES'} the >= 10x goal)")
  r["train_tokens_per_s"] = train
  r["ratio"] = ratio
  return r


if __name__ == "__main__":
  main()
