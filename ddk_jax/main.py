r"""Train a student with DDK (or a baseline) from a config file.

    python -m ddk_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m ddk_jax.main --config=configs/tinyllama.py --workdir=/ckpt/run1 \
        --config.teacher.path=/models/Llama-2-13b-hf --config.student.path=/models/TinyLlama-1.1B \
        --config.steps=20000 --config.mode=kd

Any config key can be overridden with --config.<key>=<value>.  Running the same command
again with the same --workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots, report.md. "
                               "Default: runs/<config name>.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even if keys that change the experiment (shapes, data, optimizer...) differ from the checkpoint's.")


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                      stream=sys.stderr, force=True)
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; config overrides are written --config.<key>=<value>.")
  setup_logging()
  from ddk_jax import sharding
  sharding.maybe_initialize_distributed()
  from ddk_jax import bootstrap, config_validation, trainer

  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  try:
    import jax
    config_validation.validate_config(cfg, jax.device_count())  # before any work is done
    bootstrap.prepare_models(cfg, workdir)
    summary = trainer.train(cfg, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except (config_validation.ConfigError, trainer.TrainingError, ValueError, FileNotFoundError) as e:
    logging.getLogger("ddk_jax").error("%s", e)
    sys.exit(2)
  if summary["status"] == "done":
    print(f"\nDone. Report: {os.path.join(os.path.abspath(workdir), 'report.md')}")


def run() -> None:
  app.run(_main)


if __name__ == "__main__":
  run()
