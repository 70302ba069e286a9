"""Preemption: SIGTERM (what a Cloud TPU or a spot VM sends before it goes) becomes a clean stop."""

from __future__ import annotations

import logging
import signal

import jax

_log = logging.getLogger("ddk_jax")


class Preemption:
  """Turns SIGTERM (what a TPU preemption sends) into a stop the loop checks after each step.

  One process: a Python SIGTERM handler sets a flag.  Several processes: JAX's preemption
  service (started by jax.distributed.initialize) catches SIGTERM on any host and agrees
  on one step at which every host stops (`reached_preemption_sync_point`), so all hosts
  save the same step; no Python handler is installed then (it would replace JAX's).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multihost = False

  def __enter__(self):
    from jax._src import distributed
    self._multihost = jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None
    if self._multihost:
      return self

    def handler(signum, frame):
      self.requested = True
      _log.warning("SIGTERM received: saving a checkpoint after the current step, then exiting.")
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. in a notebook worker): no handler
      self._previous = None
    return self

  def should_stop(self, step: int) -> bool:
    """Call after every step, with the same step on every host."""
    if self._multihost:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.requested = True
        _log.warning("preemption notice (SIGTERM) reached all hosts: saving step %d, then exiting.", step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
