"""One orbax checkpoint step holds everything a run needs to continue exactly.

Items of a step (directory `<workdir>/checkpoints/<step>/`):

* `state`: student params, optimizer state, `step`, `skipped_steps` (orbax StandardSave,
  sharded arrays; each host writes its own shards).
* `data`: every host's mixture iterator state (grain's handler, one JSON file per process:
  draw counter, current weights, each domain's reader/packer position).
* `meta`: JSON with the DDK controller state (current r, cached teacher losses, history),
  the resolved config, `log_state` (timers, initial/final losses, the length of
  metrics.jsonl at save time), `runtime` (process/device count, resolved mesh), `rng`
  (what randomness the run has and where its state lives) and `format_version`.

Saves are atomic (orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it after writing
`commit_success.txt`); a failed save never deletes or overwrites an older step (old steps
are garbage-collected only after a new one has committed).  At start, a step directory
without the commit marker (e.g. an interrupted copy) is moved aside with a warning, and a
step that cannot be restored falls back to the previous good one.  See docs/reliability.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
import types
from collections.abc import Callable
from typing import Any

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from ddk_jax import model as model_lib
from ddk_jax import storage
from ddk_jax import train_step as ts
from ddk_jax.model import ModelConfig

FORMAT_VERSION = 1
COMMIT_MARKER = "commit_success.txt"  # written by orbax just before the atomic rename
ITEMS = ("state", "data", "meta")


_log = logging.getLogger("ddk_jax")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written or used; the message says why and what to do."""


class IncompatibleCheckpointError(CheckpointError):
  """A checkpoint written by an incompatible ddk_jax (format version)."""


def checkpoint_dir(workdir: str) -> str:
  workdir = os.fspath(workdir)
  return (workdir.rstrip("/") if "://" in workdir else os.path.abspath(workdir)) + "/checkpoints"


def make_manager(workdir: str, ckpt_cfg: Any, *, owner: bool = False, read_only: bool = False
                 ) -> ocp.CheckpointManager:
  """The orbax manager of `<workdir>/checkpoints`: keeps the last `keep` steps plus every
  `keep_period`-th; async saves if `async_save`.  With `owner` (the training run itself),
  leftovers of interrupted saves (`*.orbax-checkpoint-tmp-*`) are removed when it starts;
  readers (export, a teacher taken from a run) never touch them."""
  directory = checkpoint_dir(workdir)
  # A reader (read_only) never saves, so nothing is ever deleted through it; orbax's own
  # read_only mode is not used because it logs warnings on every open.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(ckpt_cfg.keep),
      keep_period=int(ckpt_cfg.keep_period) or None,
      create=not read_only,
      cleanup_tmp_directories=owner and not read_only,
      enable_async_checkpointing=bool(ckpt_cfg.async_save),
  )
  return ocp.CheckpointManager(directory, options=options)


def open_reader(workdir: str) -> ocp.CheckpointManager:
  """A manager that only reads `<workdir>/checkpoints` (export, evaluation, a teacher taken from a run)."""
  return make_manager(workdir, types.SimpleNamespace(keep=1000, keep_period=0, async_save=False), read_only=True)


# ---- finding usable steps ----------------------------------------------------------------


def scan_steps(directory: str) -> tuple[list[int], list[tuple[int, str]]]:
  """(committed steps, [(step, why unusable)]) among the step directories, both sorted.

  A step counts as committed when its directory has orbax's commit marker and all items.
  """
  good, bad = [], []
  root = epath.Path(directory)
  if not root.is_dir():
    return good, bad
  for path in root.iterdir():
    if not (path.name.isdigit() and path.is_dir()):
      continue
    step = int(path.name)
    if not (path / COMMIT_MARKER).exists():
      bad.append((step, f"no {COMMIT_MARKER} (the save or a copy of it never completed)"))
      continue
    missing = [item for item in ITEMS if not (path / item).is_dir()]
    if missing:
      bad.append((step, f"items {missing} are missing"))
      continue
    good.append(step)
  return sorted(good), sorted(bad)


def latest_good_step(workdir: str) -> int | None:
  good, _ = scan_steps(checkpoint_dir(workdir))
  return good[-1] if good else None


class NoSuchStepError(ValueError):
  """A --workdir or --step with no usable checkpoint: a user mistake, named with the fix."""


def committed_step(workdir: str, step: int | None) -> int:
  """`step` (or the latest) if run `workdir` has a committed checkpoint of it; errors name the
  committed steps there are (the --workdir/--step of export and evaluate)."""
  if not storage.isdir(workdir):
    raise NoSuchStepError(f"--workdir={workdir} does not exist; pass the run directory of a ddk_jax training run.")
  ckpt_dir = checkpoint_dir(workdir)
  if not storage.isdir(ckpt_dir):
    raise NoSuchStepError(f"--workdir={workdir} is not a ddk_jax run (it has no checkpoints/ directory); pass the "
                          "--workdir a training run wrote.")
  good, bad = scan_steps(ckpt_dir)
  if not good:
    raise NoSuchStepError(f"{ckpt_dir} holds no committed checkpoint; train the run first (python -m ddk_jax.main "
                          f"--workdir={workdir} ...).")
  if step is None:
    return good[-1]
  if step not in good:
    why = dict(bad).get(step)
    shown = ", ".join(map(str, good[-10:])) + (f" (and {len(good) - 10} earlier)" if len(good) > 10 else "")
    reason = f"its checkpoint is unusable ({why})" if why else f"it has no checkpoint of step {step}"
    raise NoSuchStepError(f"--step={step}: {reason} in {ckpt_dir}; committed steps: {shown}. Leave --step out for "
                          "the latest.")
  return step


def move_aside(directory: str, step: int, why: str) -> str:
  """Renames step directory `<step>` to `<step>.unusable-<time>` (never deletes it).

  Orbax only recognises all-digit names, so the renamed directory is ignored from then on
  (a later save of the same step does not collide with it).  On gs:// the step goes to
  `<workdir>/checkpoints.unusable/<step>-<time>` (a rename there copies every object).
  Process 0 renames; callers
  on several processes must synchronise afterwards.
  """
  src = epath.Path(directory) / str(step)
  stamp = time.strftime("%Y%m%dT%H%M%S")
  # On an object store orbax deletes every uncommitted directory in its root when it
  # starts, so a step set aside there would be lost: it is kept beside the root instead.
  remote = storage.is_remote(directory)
  aside = src.parent.parent / "checkpoints.unusable" if remote else src.parent
  name = f"{step}-{stamp}" if remote else f"{step}.unusable-{stamp}"
  dst = aside / name
  if jax.process_index() == 0:
    n = 0
    while dst.exists():
      n += 1
      dst = aside / f"{name}-{n}"
    storage.move_dir(os.fspath(src), os.fspath(dst))
  _log.warning("checkpoint step %d in %s is unusable (%s); moved it to %s and ignore it.", step, directory,
               why, dst.name)
  return os.fspath(dst)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _all_processes_ok(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


# ---- save / restore of one step -----------------------------------------------------------


class _FrozenIteratorState(grain.DatasetIterator):
  """Stands in for the live data iterator in a save: grain's handler calls `get_state()`,
  and this returns the copy taken when the save was requested."""

  def __init__(self, state: Any):
    super().__init__()
    self._state = copy.deepcopy(state)

  def __next__(self):
    raise StopIteration

  def get_state(self):
    return self._state

  def set_state(self, state):
    raise TypeError("a saved data-state snapshot is write-only; restore into the live data iterator instead")


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any, meta: dict,
         *, force: bool = False) -> bool:
  """Starts saving one step (async if the manager is); returns whether it saved.

  `meta` and the iterator state are copied now, so the loop may go on mutating them.
  """
  meta = json.loads(json.dumps(dict(meta, format_version=FORMAT_VERSION), default=_json_default))
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator.get_state())),
      meta=ocp.args.JsonSave(meta),
  ), force=force)


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def check_format(meta: dict, where: str) -> None:
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise IncompatibleCheckpointError(
        f"{where} has checkpoint format version {version}, this ddk_jax reads version {FORMAT_VERSION}; "
        "resume it with the ddk_jax release that wrote it, or start a new --workdir.")


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if not isinstance(meta, dict):
    raise CheckpointError(f"checkpoint step {step} in {manager.directory}: meta is not a JSON object")
  check_format(meta, f"checkpoint step {step} in {manager.directory}")
  return meta


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any,
            *, restore_data: bool = True) -> tuple[Any, dict]:
  items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
  if restore_data:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], restored["meta"]


def _path_name(path: tuple) -> str:
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def state_shape_mismatches(state_dir: str, abstract_state: Any) -> list[str]:
  """'path: saved shape, now shape' for arrays whose shape differs ([] if the saved tree
  cannot be read: restoring it then reports why)."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that the item has no step metadata file
  try:
    saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  except Exception:  # noqa: BLE001 - unreadable metadata is reported by the restore itself
    return []
  finally:
    absl_logger.setLevel(level)
  saved_shapes = {_path_name(p): tuple(getattr(m, "shape", ()) or ())
                  for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    key = _path_name(path)
    if key not in saved_shapes:
      out.append(f"{key}: not in the checkpoint")
    elif saved_shapes[key] != tuple(leaf.shape):
      out.append(f"{key}: saved {saved_shapes[key]}, now {tuple(leaf.shape)}")
  return sorted(out, key=lambda m: not m.startswith("params/"))  # params first: easiest to read


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---- the run's checkpoints ----------------------------------------------------------------


class RunCheckpoints:
  """The checkpoints of one run directory: safe start-up, save with clear errors, restore
  with fallback to the previous good step.

      ckpt = RunCheckpoints(workdir, cfg.checkpoint)      # moves uncommitted step dirs aside
      found = ckpt.restore_latest(abstract, data_iter, check_meta)   # None: fresh start
      ckpt.save(step, state, data_iter, meta)              # CheckpointError on failure
      ckpt.close()
  """

  def __init__(self, workdir: str, ckpt_cfg: Any):
    self.directory = checkpoint_dir(workdir)
    storage.makedirs(self.directory)
    good, bad = scan_steps(self.directory)
    for step, why in bad:
      move_aside(self.directory, step, why)
    _sync("ddk_jax_checkpoint_scan")  # every process, even one that saw nothing to move (it may scan late)
    self.manager = make_manager(workdir, ckpt_cfg, owner=True)
    self._in_flight: int | None = None  # step of an async save not yet known to be committed
    self._failed = False

  # -- queries --
  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  # -- restore --
  def restore_latest(self, abstract_state: Any, data_iterator: Any,
                     check_meta: Callable[[dict], bool] | None = None) -> tuple[int, Any, dict] | None:
    """Restores the newest step that restores cleanly; None if there is no checkpoint.

    `check_meta(meta)` runs on the newest readable step's meta before any array is read;
    it may raise (e.g. a config change) and returns whether to restore the data iterator.
    A step that fails to read falls back to the previous one; when an older step
    restores, the newer unusable ones are moved aside.  Raises CheckpointError naming
    every step's error when none restores.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    failures: list[tuple[int, str]] = []
    checked = False
    restore_data = True
    mismatches = state_shape_mismatches(os.path.join(self.directory, str(steps[0]), "state"), abstract_state)
    if mismatches:
      if check_meta is not None:  # a config change explains it better, when there is one
        try:
          meta0 = restore_meta(self.manager, steps[0])
        except IncompatibleCheckpointError:
          raise
        except Exception:  # noqa: BLE001 - the shapes are reason enough
          meta0 = None
        if meta0 is not None:
          check_meta(meta0)
      raise CheckpointError(
          f"checkpoint step {steps[0]} in {self.directory} holds arrays of other shapes than this config builds "
          f"({'; '.join(mismatches[:3])}{'; ...' if len(mismatches) > 3 else ''}): a changed model cannot continue "
          "this run. Use the model config the run was started with, or a new --workdir.")
    for step in steps:
      error = meta = None
      try:
        meta = restore_meta(self.manager, step)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 - unreadable meta makes this step unusable
        error = _describe(e)
      if not _all_processes_ok(error is None):
        error = error or "another process could not read its meta"
      if error is None:
        if not checked:  # may raise (e.g. a config change): that is not a broken checkpoint
          restore_data = True if check_meta is None else bool(check_meta(meta))
          checked = True
        try:
          state, meta = restore(self.manager, step, abstract_state, data_iterator, restore_data=restore_data)
          if int(jax.device_get(state["step"])) != step:
            raise CheckpointError(f"its state holds step {int(jax.device_get(state['step']))}")
        except Exception as e:  # noqa: BLE001 - any read error makes this step unusable
          error = _describe(e)
        if not _all_processes_ok(error is None):
          error = error or "another process could not restore it"
      if error is None:
        for bad_step, why in failures:
          move_aside(self.directory, bad_step, why)
        if failures:
          _sync("ddk_jax_checkpoint_fallback")
          self.manager.reload()
          _log.warning("resumed from step %d, the newest checkpoint that restores.", step)
        return step, state, meta
      _log.warning("checkpoint step %d in %s cannot be restored: %s", step, self.directory, error)
      failures.append((step, error))
    listing = "\n".join(f"  step {s}: {why}" for s, why in failures)
    raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored:\n{listing}\nIf the files were damaged, restore "
        f"them from a copy; to start the run over, move {self.directory} aside (nothing was changed on disk).")

  # -- save --
  def save(self, step: int, state: Any, data_iterator: Any, meta: dict, *, force: bool = False) -> None:
    """Starts a save of `step`; raises CheckpointError if it (or the previous async one) fails."""
    if self._failed:
      raise CheckpointError("an earlier checkpoint save failed; not saving again")
    self.wait()  # surfaces a failure of the previous async save under its own step
    try:
      saved = save(self.manager, step, state, data_iterator, meta, force=force)
    except Exception as e:  # noqa: BLE001
      self._raise_save_error(step, e)
    if saved:
      self._in_flight = step

  def wait(self) -> None:
    """Blocks until the async save (if any) has committed; CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._raise_save_error(self._in_flight, e)
    self._in_flight = None

  def write_error(self, e: OSError) -> CheckpointError:
    """The error for another file of the run (metrics.jsonl, the report) that could not be written,
    a full disk say, once any in-flight save has been waited for: which file, why, and which
    committed checkpoints the rerun resumes from."""
    good, _ = scan_steps(self.directory)
    where = e.filename or "a file of the workdir"
    intact = (f"the committed checkpoints {good} are intact; rerun the same command after fixing it and the run "
              f"resumes from step {good[-1]} (rows logged after it are dropped and logged again)." if good else
              "no checkpoint was committed yet; rerun the same command after fixing it to start the run again.")
    return CheckpointError(f"writing {where} failed: {e.strerror or e}. {_errno_hint(e)}Nothing committed was "
                           f"lost: {intact}")

  def close(self, *, quiet: bool = False) -> None:
    """Waits for an in-flight save and closes the manager (quiet: log a failure, do not raise)."""
    try:
      if not self._failed:
        self.wait()
    except CheckpointError as e:
      if not quiet:
        raise
      _log.error("%s", e)
    finally:
      try:
        self.manager.close()
      except Exception as e:  # noqa: BLE001
        if not quiet and not self._failed:
          raise CheckpointError(f"closing the checkpoint manager of {self.directory} failed: {e}") from e

  def _raise_save_error(self, step: int | None, e: BaseException) -> None:
    self._failed = True
    good, _ = scan_steps(self.directory)
    good = [s for s in good if s != step] if step is not None else good
    hint = _errno_hint(e)
    intact = (f"the committed checkpoints {good} are intact; rerun the same command after fixing it and the run "
              f"resumes from step {good[-1]}." if good else
              "no earlier checkpoint exists; rerun the same command after fixing it to start the run again.")
    raise CheckpointError(
        f"saving checkpoint step {step} to {self.directory} failed: {type(e).__name__}: {e}. {hint}"
        f"Nothing was overwritten or deleted: {intact}") from e


def _describe(e: BaseException) -> str:
  return f"{type(e).__name__}: {e}".strip()[:800]


def _errno_hint(e: BaseException) -> str:
  import errno
  chain = [e]
  while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
    nxt = chain[-1].__cause__ or chain[-1].__context__
    if nxt in chain or len(chain) > 10:
      break
    chain.append(nxt)
  text = " ".join(str(x) for x in chain)
  codes = {getattr(x, "errno", None) for x in chain}
  if errno.ENOSPC in codes or "No space left" in text:
    return "The disk is full: free space (or move the workdir to a larger disk). "
  if errno.EROFS in codes or errno.EACCES in codes or errno.EPERM in codes or "Read-only" in text:
    return "The checkpoint directory is not writable: fix its permissions or mount. "
  return ""


def restore_student_params(workdir: str, mesh, rules, overrides: dict | None = None,
                           step: int | None = None) -> tuple[ModelConfig, Any]:
  """The student params of a finished (or running) ddk_jax run, e.g. as a teacher."""
  step = latest_good_step(workdir) if step is None else step  # committed steps only
  if step is None:
    raise CheckpointError(f"{workdir} has no checkpoint to take a model from; train it first "
                        f"(python -m ddk_jax.main --workdir={workdir} ...) or point at another workdir.")
  manager = open_reader(workdir)
  meta = restore_meta(manager, step)
  saved = dict(meta["config"]["student"]["model"])
  mcfg = ModelConfig.from_dict(saved)
  stored_dtype = mcfg.param_dtype
  if overrides:
    mcfg = dataclasses.replace(mcfg, **{k: v for k, v in overrides.items() if k != "param_dtype"})
  sh = ts.params_shardings(mcfg, mesh, rules)
  shapes, _ = model_lib.param_shapes_and_axes(mcfg)
  abstract = jax.tree.map(lambda s, shd: jax.ShapeDtypeStruct(s, model_lib.DTYPES[stored_dtype], sharding=shd),
                          shapes, sh, is_leaf=lambda x: isinstance(x, tuple))
  # Restore only the params subtree: the optimizer state is never read.
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={"params": abstract},
          restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), {"params": abstract}),
          partial_restore=True)))
  params = restored["state"]["params"]
  if overrides and overrides.get("param_dtype") and overrides["param_dtype"] != stored_dtype:
    dt = model_lib.DTYPES[overrides["param_dtype"]]
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dt), p), out_shardings=sh)(params)
    mcfg = dataclasses.replace(mcfg, param_dtype=overrides["param_dtype"])
  manager.close()
  return mcfg, params
