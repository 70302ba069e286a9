"""One orbax checkpoint step holds everything a run needs to continue exactly.

Items of a step: `state` (student params, optimizer state, step, skip counter),
`data` (every host's mixture iterator state, grain's handler: one JSON file per
process), `meta` (DDK controller state: current r, cached teacher losses, history;
the resolved config; the format version).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

FORMAT_VERSION = 1
# Keys that may change between a run and its resume without changing what is computed.
RESUMABLE_CHANGES = ("steps", "logging.", "eval.", "checkpoint.")

_log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message says why and what to do."""


def make_manager(workdir: str, ckpt_cfg: Any) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(ckpt_cfg.keep),
      keep_period=int(ckpt_cfg.keep_period) or None,
      create=True,
      enable_async_checkpointing=bool(ckpt_cfg.async_save),
  )
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any, meta: dict,
         *, force: bool = False) -> bool:
  meta = dict(meta, format_version=FORMAT_VERSION)
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave(meta),
  ), force=force)


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise CheckpointError(
        f"checkpoint step {step} in {manager.directory} has format version {version}, this ddk_jax reads "
        f"version {FORMAT_VERSION}; resume it with the ddk_jax release that wrote it, or start a new workdir.")
  return meta


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict]:
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator),
      meta=ocp.args.JsonRestore(),
  ))
  return restored["state"], restored["meta"]


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_changes(saved: dict, current: dict) -> list[str]:
  """Keys whose values differ between a saved resolved config and the current one,
  excluding keys that are safe to change on resume."""
  a, b = _flatten(saved), _flatten(json.loads(json.dumps(current, default=str)))
  changed = []
  for key in sorted(set(a) | set(b)):
    if a.get(key) != b.get(key) and not any(key == p or key.startswith(p) for p in RESUMABLE_CHANGES):
      changed.append(key)
  return changed
