"""What every command-line entry point shares: logging set-up."""

from __future__ import annotations

import logging
import sys


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                      stream=sys.stderr, force=True)
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
