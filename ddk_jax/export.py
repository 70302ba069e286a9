r"""Export a run's student to a Hugging Face directory that transformers loads.

    python -m ddk_jax.export --workdir=runs/demo --out=exported/demo_student
    python -m ddk_jax.export --workdir=/ckpt/ddk_tinyllama --out=/models/tinyllama-ddk --step=30000

Every process of a multi-host job runs it (the gathers are collective); process 0 writes.
The export is atomic: a failed export leaves no partial directory behind.  Progress
(tensors and bytes written) is a bar on a terminal, else a log line every ~10%.

The run's config keys are documented in docs/config.md.  Exit status 2: a bad flag, a
--workdir that is not a ddk_jax run, a --step without a committed checkpoint (the message
lists the ones there are), or an --out that exists (pass --overwrite).
"""

from __future__ import annotations

import json

from absl import flags

from ddk_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a ddk_jax training run.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for the HF checkpoint.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_ARCH = flags.DEFINE_enum("architecture", None, ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"],
                          "HF architecture (default: the student's source architecture, else inferred).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Tensor dtype in the safetensors.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file, e.g. 5GB, 500MB or a "
                                 "number of bytes.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json or HF directory to ship (default: the run's).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out directory.")


def parse_size(text: str) -> int:
  """Bytes in "5GB", "500MB", "1.5GiB", "4096" (KB/MB/GB/TB are powers of 1024)."""
  units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
           "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
  t = str(text).strip().upper()
  number, factor = t, 1
  for unit, f in units.items():
    if t.endswith(unit):
      number, factor = t[:-len(unit)].strip(), f
      break
  try:
    size = int(float(number) * factor)
  except ValueError:
    size = 0
  if size <= 0:
    raise ValueError(f"--max_shard_size={text}: expected a positive size such as 5GB, 500MB or a number of bytes.")
  return size



def export_run(workdir: str, out: str, *, step: int | None = None, architecture: str | None = None,
               dtype: str = "bfloat16", max_shard_size_bytes: int = 5 * 2**30, tokenizer: str | None = None,
               overwrite: bool = False, progress: bool | None = None) -> str:
  from ddk_jax import checkpointing, sharding
  from ddk_jax.data.tokenizer import load_tokenizer
  from ddk_jax.hf import export_hf_checkpoint

  step = checkpointing.committed_step(workdir, step)
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  rules = sharding.DEFAULT_RULES
  cfg, params = checkpointing.restore_student_params(workdir, mesh, rules, step=step)
  manager = checkpointing.open_reader(workdir)
  meta = checkpointing.restore_meta(manager, step)
  manager.close()
  run_cfg = meta["config"]
  tokenizer = tokenizer or run_cfg["data"].get("tokenizer") or None
  ids = {}
  if tokenizer:
    tok = load_tokenizer(tokenizer)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
  if architecture is None and run_cfg["student"]["source"] == "hf":
    from ddk_jax import storage
    config_json = json.loads(storage.read_text(storage.join(run_cfg["student"]["path"], "config.json")))
    architecture = (config_json.get("architectures") or [None])[0]
  return export_hf_checkpoint(params, cfg, out, architecture=architecture, tokenizer_path=tokenizer,
                              max_shard_size_bytes=max_shard_size_bytes, dtype=dtype, overwrite=overwrite,
                              progress=progress, **ids)


def _main(argv) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {' '.join(argv[1:])}; see --help for the flags.")
  try:
    max_shard_size_bytes = parse_size(_MAX_SHARD.value)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  from ddk_jax import multihost
  from ddk_jax.cli import setup_logging
  setup_logging()
  multihost.initialize_or_exit()
  try:
    out = export_run(_WORKDIR.value, _OUT.value, step=_STEP.value, architecture=_ARCH.value, dtype=_DTYPE.value,
                     max_shard_size_bytes=max_shard_size_bytes, tokenizer=_TOKENIZER.value,
                     overwrite=_OVERWRITE.value)
  except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:  # CheckpointError: a RuntimeError
    cli.fail(str(e))
  print(f"exported to {out}")


def run() -> None:
  cli.run(_main, prog="ddk_jax.export", config_flag=None)


if __name__ == "__main__":
  run()
