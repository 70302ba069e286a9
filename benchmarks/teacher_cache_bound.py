r"""How far a top-k teacher cache's KD term is from the full teacher's, on a run's own rows.

    .venv/bin/python benchmarks/teacher_cache_bound.py --config=configs/demo.py --workdir=runs/demo \
        --cache_dir=runs/demo_teacher_cache [--rows=32] [--temperature=1]

Reads the first `--rows` rows of every domain's stream back from the cache (checking each row's
CRC against the row the pipeline makes), runs the config's teacher and student (as a run with
that --workdir would load them; a student that the config pre-trains is pre-trained first) on the
same rows, and prints per domain the teacher's mass in its top k, the full KD term, the cached one
and their ratio (forward KL, the config's divergence if set; docs/teacher_cache.md).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--workdir", required=True, help="where relative teacher/student paths live")
  ap.add_argument("--cache_dir", required=True)
  ap.add_argument("--rows", type=int, default=32, help="rows per domain")
  ap.add_argument("--temperature", type=float, default=1.0)
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from ddk_jax import bootstrap, chunked_loss, cli, data as data_lib, losses, model as model_lib
  from ddk_jax import run_setup, sharding, teacher_cache
  from ddk_jax.data import pipeline

  cfg, problem = cli.load_config_file(args.config)
  if problem:
    sys.exit(problem)
  cfg, _ = bootstrap.prepare_models(cfg, args.workdir)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh.rules)
  tcfg, tp = run_setup._load_model(cfg, "teacher", mesh, rules, int(cfg.seed) + 1)
  scfg, sp = run_setup._load_model(cfg, "student", mesh, rules, int(cfg.seed))
  tok = data_lib.load_tokenizer_from_config(cfg.data)
  manifest = data_lib.ensure_prepared(cfg.data)
  cache = teacher_cache.open_cache(args.cache_dir)
  valid = int(tok.max_id) + 1
  div = str(cfg.loss.divergence)
  print(f"teacher {tcfg.num_params() / 1e6:.1f}M, student {scfg.num_params() / 1e6:.1f}M, k={cache.layout.top_k} "
        f"({cache.layout.dtype}), vocab {valid}, {div}, T={args.temperature}, {args.rows} rows of "
        f"{int(cfg.data.seq_len)} tokens per domain")
  print("| domain | teacher mass in top k | full KD / token | cached KD / token | cached / full |")
  print("|---|---:|---:|---:|---:|")
  totals = np.zeros(3)
  for spec in data_lib.domain_specs(cfg.data):
    it = iter(pipeline.domain_rows(cfg.data.prepared_dir, manifest, spec.name, domain_id=spec.domain_id,
                                   seq_len=int(cfg.data.seq_len), seed=int(cfg.data.seed),
                                   shuffle=bool(cfg.data.shuffle), keyed=True))
    rows = [next(it) for _ in range(args.rows)]
    extras = [cache.row_extras(spec.domain_id, int(r["cache_row"]), r) for r in rows]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in ("inputs", "targets", "segment_ids",
                                                                        "positions")}
    mask = batch["segment_ids"] != 0
    fwd = lambda p, c: model_lib.apply_hidden(p, c, batch["inputs"], batch["positions"], batch["segment_ids"])
    hs, ws = fwd(sp, scfg), model_lib.head_weight(sp, scfg)
    ht, wt = fwd(tp, tcfg), model_lib.head_weight(tp, tcfg)
    kw = dict(temperature=args.temperature, gamma=1.0, divergence=div,
              valid_vocab=valid if valid < ws.shape[1] else None)
    _, (_, full) = chunked_loss.chunked_kd_loss_sum(hs, ws, ht, wt, batch["targets"], mask, **kw)
    cached = losses.CachedTeacher(*(jnp.asarray(np.stack([e[k] for e in extras]))
                                    for k in ("teacher_ids", "teacher_logp", "teacher_tail")))
    _, (_, part) = chunked_loss.chunked_kd_loss_sum_cached(hs, ws, cached, batch["targets"], mask, **kw)
    n = float(jnp.sum(mask))
    mass = float(jnp.sum(jnp.where(mask, jnp.sum(jnp.exp(cached.logp.astype(jnp.float32)), -1), 0.0))) / n
    f, c = float(jnp.sum(full)) / n, float(jnp.sum(part)) / n
    totals += (mass * n, f * n, c * n)
    print(f"| {spec.name} | {mass:.3f} | {f:.4f} | {c:.4f} | {c / f:.3f} |")
  m, f, c = totals / (args.rows * int(cfg.data.seq_len) * len(data_lib.domain_specs(cfg.data)))
  print(f"| all | {m:.3f} | {f:.4f} | {c:.4f} | {c / f:.3f} |")
  print(f"(processes: {jax.process_count()}; the student as loaded from the config)")


if __name__ == "__main__":
  main()
