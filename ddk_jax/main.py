r"""Train a student with DDK (or a baseline) from a config file.

    python -m ddk_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m ddk_jax.main --config=configs/tinyllama.py --workdir=/ckpt/run1 \
        --config.teacher.path=/models/Llama-2-13b-hf --config.student.path=/models/TinyLlama-1.1B \
        --config.steps=20000 --config.mode=kd

Any config key can be overridden with --config.<key>=<value>; every key is documented in
docs/config.md.  Running the same command again with the same --workdir resumes from the
latest checkpoint.

Exit codes (docs/reliability.md):
  0    done (or already done)
  2    bad command line, config or input (a message names the key or file and the fix);
       nothing was trained
  3    stopped: optimizer.max_consecutive_skips non-finite steps in a row; the last good
       checkpoint is kept, rerun after fixing the cause
  4    a checkpoint could not be written (disk full, permissions) or none could be read;
       committed checkpoints are kept
  143  preempted (SIGTERM): the checkpoint of the current step was saved; rerun the same
       command to resume
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from ddk_jax import cli
from ddk_jax.cli import setup_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py) with get_config(). Override any key with "
    "--config.<key>=<value>; every key is documented in docs/config.md.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots, report.md. "
                               "Default: runs/<config name>.")
EXIT_CONFIG, EXIT_NON_FINITE, EXIT_CHECKPOINT, EXIT_PREEMPTED = 2, 3, 4, 143

_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even if keys that change the experiment (shapes, data, optimizer...) differ from the checkpoint's.")


def enable_compilation_cache(cache_dir: str) -> str | None:
  """Points JAX's persistent compilation cache at `cache_dir`; returns the directory used.

  Every executable is cached (no minimum compile time): on CPU even the ~1 s compiles of
  the eval steps are a visible share of a short run. A directory that cannot be created
  only costs speed, so it is a warning, not an error.
  """
  if not cache_dir:
    return None
  import jax
  path = cache_dir if "://" in cache_dir else os.path.abspath(os.path.expanduser(cache_dir))
  if "://" not in path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      logging.getLogger("ddk_jax").warning(
          "compilation_cache_dir=%r cannot be created (%s); compiling without a persistent cache. Set "
          "--config.compilation_cache_dir to a writable directory, or '' to silence this.", cache_dir, e)
      return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def _main(argv) -> None:
  cfg = cli.require_config(argv, _CONFIG.value, "the experiment to train")
  setup_logging()
  from ddk_jax import multihost
  multihost.initialize_or_exit()
  from ddk_jax import checkpointing, config_validation, trainer

  config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = _WORKDIR.value or os.path.join("runs", config_name)
  try:
    enable_compilation_cache(cfg.compilation_cache_dir)
    # Validates the config before any work, pre-trains what the config asks for, then trains.
    summary = trainer.train(cfg, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except trainer.NonFiniteError as e:
    logging.getLogger("ddk_jax").error("%s", e)
    sys.exit(EXIT_NON_FINITE)
  except checkpointing.CheckpointError as e:
    logging.getLogger("ddk_jax").error("%s", e)
    sys.exit(EXIT_CHECKPOINT)
  except (config_validation.ConfigError, trainer.TrainingError, ValueError, FileNotFoundError) as e:
    logging.getLogger("ddk_jax").error("%s", e)
    sys.exit(EXIT_CONFIG)
  if summary["status"] == "preempted":
    sys.exit(EXIT_PREEMPTED)
  if summary["status"] == "done":
    from ddk_jax import storage
    print(f"\nDone. Report: {storage.join(storage.resolve(workdir), 'report.md')}")


def run() -> None:
  cli.run(_main, prog="ddk_jax.main")


if __name__ == "__main__":
  run()
