r"""Export a run's student to a Hugging Face directory that transformers loads.

    python -m ddk_jax.export --workdir=runs/demo --out=exported/demo_student
    python -m ddk_jax.export --workdir=/ckpt/ddk_tinyllama --out=/models/tinyllama-ddk --step=30000

Every process of a multi-host job runs it (the gathers are collective); process 0 writes.
The export is atomic: a failed export leaves no partial directory behind.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a ddk_jax training run.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for the HF checkpoint.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_ARCH = flags.DEFINE_enum("architecture", None, ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"],
                          "HF architecture (default: the student's source architecture, else inferred).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Tensor dtype in the safetensors.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file, e.g. 5GB or 500MB.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json or HF directory to ship (default: the run's).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out directory.")


def parse_size(text: str) -> int:
  units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
  t = text.strip().upper()
  for unit, factor in units.items():
    if t.endswith(unit):
      return int(float(t[:-len(unit)]) * factor)
  return int(t)


def export_run(workdir: str, out: str, *, step: int | None = None, architecture: str | None = None,
               dtype: str = "bfloat16", max_shard_size_bytes: int = 5 * 2**30, tokenizer: str | None = None,
               overwrite: bool = False) -> str:
  from ddk_jax import checkpointing, sharding
  from ddk_jax.data.tokenizer import load_tokenizer
  from ddk_jax.hf import export_hf_checkpoint

  config_path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(config_path):
    raise FileNotFoundError(f"{workdir} has no checkpoints/ directory; pass the --workdir of a ddk_jax run.")
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  rules = sharding.DEFAULT_RULES
  cfg, params = checkpointing.restore_student_params(workdir, mesh, rules, step=step)
  manager = checkpointing.open_reader(workdir)
  meta = checkpointing.restore_meta(manager, step if step is not None else manager.latest_step())
  manager.close()
  run_cfg = meta["config"]
  tokenizer = tokenizer or run_cfg["data"].get("tokenizer") or None
  ids = {}
  if tokenizer:
    tok = load_tokenizer(tokenizer)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
  if architecture is None and run_cfg["student"]["source"] == "hf":
    with open(os.path.join(run_cfg["student"]["path"], "config.json"), encoding="utf-8") as f:
      architecture = (json.load(f).get("architectures") or [None])[0]
  return export_hf_checkpoint(params, cfg, out, architecture=architecture, tokenizer_path=tokenizer,
                              max_shard_size_bytes=max_shard_size_bytes, dtype=dtype, overwrite=overwrite, **ids)


def _main(argv) -> None:
  del argv
  from ddk_jax import multihost
  from ddk_jax.cli import setup_logging
  setup_logging()
  multihost.initialize_or_exit()
  try:
    out = export_run(_WORKDIR.value, _OUT.value, step=_STEP.value, architecture=_ARCH.value, dtype=_DTYPE.value,
                     max_shard_size_bytes=parse_size(_MAX_SHARD.value), tokenizer=_TOKENIZER.value,
                     overwrite=_OVERWRITE.value)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    logging.getLogger("ddk_jax").error("%s", e)
    sys.exit(2)
  print(f"exported to {out}")


if __name__ == "__main__":
  app.run(_main)
