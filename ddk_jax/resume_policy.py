"""What may change when a run resumes, and what resuming then does.

A resume continues the experiment the checkpoint started. Keys that change what is
computed (model, data, optimizer, DDK settings...) are refused unless the user accepts the
change (`--allow_config_change`); keys in `RESUMABLE_CHANGES` may change freely and are
logged. A different process count restarts the data pipelines from the start of their new
shards, and any change of the validation rows makes the cached teacher losses stale.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from ddk_jax.errors import TrainingError

# Keys that may change between a run and its resume without changing what is computed
# up to the restored step (a prefix ends with '.').  `steps` stretches a cosine schedule
# from the restored step on; that is the point of changing it, and it is logged.
RESUMABLE_CHANGES = ("steps", "logging.", "eval.", "checkpoint.", "optimizer.max_consecutive_skips",
                     "compilation_cache_dir", "data.num_prepare_workers", "teacher.cache_dir")

_log = logging.getLogger("ddk_jax")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _resumable(key: str) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_CHANGES)


def _defaults() -> dict:
  from ddk_jax.config_defaults import base_config
  return _flatten(json.loads(base_config().to_json_best_effort()))


def config_changes(saved: dict, current: dict) -> list[str]:
  """Keys whose values differ between a saved resolved config and the current one,
  excluding keys that are safe to change on resume.  A key the saved config does not have
  (added to ddk_jax since the run started) is unchanged while it has its default value."""
  a, b = _flatten(saved), _flatten(json.loads(json.dumps(current, default=str)))
  defaults = _defaults()
  new_at_default = {k for k in set(b) - set(a) if k in defaults and b[k] == defaults[k]}
  return [k for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and not _resumable(k) and k not in new_at_default]


def resumable_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """The accepted changes, {key: (saved, current)}, to log on resume."""
  a, b = _flatten(saved), _flatten(json.loads(json.dumps(current, default=str)))
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and _resumable(k)}


def runtime_changes(saved: dict | None, current: dict) -> list[str]:
  """Differences in how the run is laid out (process count, device count, resolved mesh)."""
  if not saved:
    return []
  out = []
  for key, what in (("num_processes", "number of processes"), ("num_devices", "number of devices"),
                    ("mesh_shape", "resolved mesh shape")):
    if saved.get(key) != current.get(key):
      out.append(f"{what} ({key}: {saved.get(key)} -> {current.get(key)})")
  return out


@dataclasses.dataclass(frozen=True)
class ResumePlan:
  restore_data: bool  # False: the data pipelines start over on their (new) shards


def check_resume(saved_meta: dict, config: dict, runtime: dict, *, workdir: str, allow_config_change: bool,
                 cosine_schedule: bool) -> ResumePlan:
  """Refuses config changes that would change the experiment; logs the accepted ones."""
  changed = config_changes(saved_meta["config"], config)
  layout = runtime_changes(saved_meta.get("runtime"), runtime)
  if (changed or layout) and not allow_config_change:
    raise TrainingError(
        f"the config differs from the one {workdir} was started with, in keys {changed + layout}; changing "
        "them mid-run would silently change the experiment. Use the original values, a new --workdir, or pass "
        "--allow_config_change to accept the change.")
  if changed or layout:
    _log.warning("resuming with changed keys %s (--allow_config_change): the run is no longer the one it "
                 "started as.", changed + layout)
  for key, (old, new) in resumable_changes(saved_meta["config"], config).items():
    _log.info("resuming with %s changed from %r to %r", key, old, new)
    if key == "steps" and cosine_schedule:
      _log.warning("steps changed from %s to %s: the cosine learning-rate schedule now decays over %s steps "
                   "(from the restored step on).", old, new, new)
  saved_processes = (saved_meta.get("runtime") or {}).get("num_processes", runtime["num_processes"])
  if saved_processes != runtime["num_processes"]:
    _log.warning("the checkpoint was written by %d processes, this run has %d: the data pipelines start from "
                 "the beginning of their (new) shards.", saved_processes, runtime["num_processes"])
    return ResumePlan(restore_data=False)
  return ResumePlan(restore_data=True)


def check_resume_step(step: int, total_steps: int, workdir: str) -> None:
  if step > total_steps:
    raise TrainingError(f"{workdir} holds a checkpoint of step {step}, beyond steps={total_steps}; pass "
                        f"--config.steps >= {step} to continue it, or use a new --workdir.")
