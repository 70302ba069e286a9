"""Faults, in-process on the emulated 8-device mesh: non-finite steps, disk full during a
save, a workdir that cannot be written, a missing teacher, and the CLI's exit codes.

The recoveries are compared with the uninterrupted reference run (tiny_run.REFERENCE):
after fixing the fault and rerunning, the run is bit-identical to one that never failed.
"""

import contextlib
import errno
import logging
import os
import subprocess

import jax
import jax.numpy as jnp
import pytest

import tiny_run
from ddk_jax import checkpointing, trainer
from ddk_jax.config_validation import ConfigError
from ddk_jax import train_step as ts

# Compared with the reference run on the 2 x 2 x 2 mesh of the default 8-device session.
pytestmark = pytest.mark.devices(8)



@pytest.fixture(scope="module")
def env(tmp_path_factory):
  with tiny_run.reference_env(tmp_path_factory, "faults") as e:
    yield e


_cfg = tiny_run.reference_config


def _assert_same_run(workdir, ref, step=8):
  assert tiny_run.comparable_metrics(workdir) == tiny_run.comparable_metrics(ref)
  state, meta = tiny_run.read_checkpoint(workdir, step)
  ref_state, ref_meta = tiny_run.read_checkpoint(ref, step)
  tiny_run.assert_same_state(state, ref_state)
  assert meta["controller"] == ref_meta["controller"]


# ---- numerical faults -----------------------------------------------------------------------


def _poison_teacher_from(monkeypatch, first_bad_step: int):
  """From optimizer step `first_bad_step` on, the teacher's params are NaN inside the train
  step (so the KD loss and every gradient are NaN). Deterministic, and nothing of it is
  saved: the teacher is not part of the checkpoint."""
  real = ts.make_train_step

  def make(*args, **kwargs):
    step = real(*args, **kwargs)

    def poisoned(state, teacher_params, batch):
      bad = state["step"] >= first_bad_step
      teacher_params = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x).astype(x.dtype), teacher_params)
      return step(state, teacher_params, batch)
    return poisoned

  monkeypatch.setattr(ts, "make_train_step", make)


def test_non_finite_steps_are_skipped_then_stop_the_run_keeping_the_last_good_checkpoint(env, monkeypatch,
                                                                                          caplog):
  workdir = os.path.join(env["tmp"], "nan")
  cfg = _cfg(env, **{"optimizer.max_consecutive_skips": 3})
  _poison_teacher_from(monkeypatch, 3)  # steps 4, 5, 6 (1-based, as logged) are non-finite
  with caplog.at_level(logging.WARNING, logger="ddk_jax"), pytest.raises(trainer.NonFiniteError) as e:
    trainer.train(cfg, workdir)
  msg = str(e.value)
  assert "steps 4..6: 3 consecutive steps had a non-finite loss or gradient" in msg
  assert "optimizer.max_consecutive_skips=3" in msg and "last good checkpoint is step 2" in msg
  # Each skipped step was logged with its batch's domains, and counted in metrics.jsonl.
  assert "step 4: non-finite loss or gradient, update skipped (1 in a row, 1 in all; batch domains {" in caplog.text
  assert "not saving the checkpoint of step 4" in caplog.text
  train = {r["step"]: r for r in tiny_run.metrics(workdir) if r["kind"] == "train"}
  assert [train[s]["skipped_steps"] for s in (3, 4, 5, 6)] == [0, 1, 2, 3]
  assert all(train[s]["loss"] != train[s]["loss"] for s in (4, 5, 6))  # NaN
  # No checkpoint after the fault: step 2 is the last, and it is the reference's step 2.
  assert tiny_run.committed_steps(workdir) == [2]
  tiny_run.assert_same_state(tiny_run.read_checkpoint(workdir, 2)[0], tiny_run.read_checkpoint(env["ref"], 2)[0])

  # The fault fixed, the same call resumes from step 2 and ends exactly as the reference.
  monkeypatch.undo()
  assert trainer.train(cfg, workdir)["status"] == "done"
  _assert_same_run(workdir, env["ref"])


def test_negative_skip_limit_is_refused(env, tmp_path):
  with pytest.raises(ConfigError, match="optimizer.max_consecutive_skips=-1"):
    trainer.train(_cfg(env, **{"optimizer.max_consecutive_skips": -1}), str(tmp_path / "w"))


# ---- disk full during a save ------------------------------------------------------------------


@contextlib.contextmanager
def _small_disk(path: str, size_mb: int):
  """A real tmpfs of `size_mb` at `path` when this process may mount one; else None."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0:
    yield None
    return
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", path], capture_output=True)
  if r.returncode:
    yield None
    return
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", path], check=False)


def _fill(disk: str, leave_bytes: int) -> str:
  filler = os.path.join(disk, "filler")
  st = os.statvfs(disk)
  free = st.f_bavail * st.f_frsize
  with open(filler, "wb") as f:
    f.write(b"\0" * max(free - leave_bytes, 0))
  return filler


def test_disk_full_during_a_save_keeps_every_good_checkpoint(env, monkeypatch):
  """The run resumes from step 4 with keep=2; the save of step 6 hits a full disk (a real
  ENOSPC on a small tmpfs when mounting is allowed, else an injected one).  The error says
  what happened and what is intact; steps 2 and 4 are still there and restore to exactly
  what they were; after freeing space the same call finishes identical to the reference."""
  with _small_disk(os.path.join(env["tmp"], "disk"), 24) as disk:
    base = disk or os.path.join(env["tmp"], "disk")
    workdir = tiny_run.copy_run(env["ref"], os.path.join(base, "run"), keep_steps=[2, 4])
    cfg = _cfg(env, **{"checkpoint.keep": 2})
    if disk:
      filler = _fill(disk, leave_bytes=160 * 1024)  # the rows still fit; a checkpoint (~800 KB) does not
    else:
      import grain._src.python.checkpoint.handler as grain_handler
      real_save = grain_handler.CheckpointHandler.save

      def full(self, directory, *a, **k):
        if os.path.basename(os.path.dirname(str(directory))).startswith("6."):
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return real_save(self, directory, *a, **k)
      monkeypatch.setattr(grain_handler.CheckpointHandler, "save", full)

    with pytest.raises(checkpointing.CheckpointError) as e:
      trainer.train(cfg, workdir)
    msg = str(e.value)
    assert "disk is full" in msg and "[2, 4] are intact" in msg and "resumes from step 4" in msg
    # On the real small disk, which write meets it full first is a race: the save of step 6, or a
    # metrics.jsonl row logged while that save is in flight.
    assert "saving checkpoint step 6" in msg or (disk and "metrics.jsonl failed" in msg), msg
    assert tiny_run.committed_steps(workdir) == [2, 4]
    for step in (2, 4):  # nothing overwritten: both restore to the reference's bytes
      tiny_run.assert_same_state(tiny_run.read_checkpoint(workdir, step)[0],
                                 tiny_run.read_checkpoint(env["ref"], step)[0])

    if disk:
      os.remove(filler)
    else:
      monkeypatch.undo()
    assert trainer.train(cfg, workdir)["status"] == "done"
    assert tiny_run.committed_steps(workdir) == [6, 8]
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
    _assert_same_run(workdir, env["ref"])


def test_disk_full_writing_metrics_names_the_file_and_keeps_every_good_checkpoint(env, monkeypatch):
  """metrics.jsonl cannot take the rows of step 6 (ENOSPC on its flush): a CheckpointError names
  the file, the full disk and the intact checkpoints (the CLI's exit 4, no traceback); the
  rerun drops the rows logged after step 4 and ends identical to the reference."""
  from ddk_jax import storage
  workdir = tiny_run.copy_run(env["ref"], os.path.join(env["tmp"], "metrics_full"), keep_steps=[2, 4])
  cfg = _cfg(env, **{"checkpoint.keep": 2})
  real_write, real_flush = storage.AppendLog.write, storage.AppendLog.flush
  last = {}

  def write(self, text):
    last[self.path] = text
    return real_write(self, text)

  def flush(self):
    if self.path.endswith("metrics.jsonl") and '"step": 6,' in last.get(self.path, ""):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_flush(self)
  monkeypatch.setattr(storage.AppendLog, "write", write)
  monkeypatch.setattr(storage.AppendLog, "flush", flush)
  with pytest.raises(checkpointing.CheckpointError) as e:
    trainer.train(cfg, workdir)
  msg = str(e.value)
  assert f"writing {os.path.join(workdir, 'metrics.jsonl')} failed: No space left on device" in msg
  assert "disk is full" in msg and "[2, 4] are intact" in msg and "resumes from step 4" in msg, msg
  monkeypatch.undo()
  assert trainer.train(cfg, workdir)["status"] == "done"
  _assert_same_run(workdir, env["ref"])


# ---- bad input ----------------------------------------------------------------------------------


def test_workdir_that_cannot_be_written(env, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(trainer.TrainingError, match=r"workdir .*a_file/run.* is not writable.*--workdir="):
    trainer.train(_cfg(env), str(a_file / "run"))
  with _small_disk(str(tmp_path / "ro"), 1) as disk:
    if disk:  # a read-only mount: not writable even for root
      subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
      target = os.path.join(disk, "run")
    elif os.geteuid() != 0:
      os.chmod(tmp_path / "ro", 0o500)
      target = str(tmp_path / "ro" / "run")
    else:  # root without mount: no permission bit stops root, but nothing can be created in /proc
      target = "/proc/ddk_jax_run"
    with pytest.raises(trainer.TrainingError, match="is not writable"):
      trainer.train(_cfg(env), target)


def test_missing_teacher_fails_before_any_work(env, tmp_path, monkeypatch):
  import ddk_jax.data as data_lib

  def no_work(*a, **k):
    raise AssertionError("data preparation started before the teacher was checked")
  monkeypatch.setattr(data_lib, "ensure_prepared", no_work)
  empty = tmp_path / "empty_run"
  empty.mkdir()
  workdir = tmp_path / "w"
  with pytest.raises(trainer.TrainingError,
                     match=r"teacher.source='workdir' but teacher.path=.*empty_run.* has no committed checkpoint"):
    trainer.train(_cfg(env, **{"teacher.source": "workdir", "teacher.path": str(empty)}), str(workdir))
  assert not (workdir / "checkpoints").exists()
  # A teacher run whose only step never committed counts as missing too.
  partial = tmp_path / "partial_run"
  tiny_run.copy_run(env["ref"], str(partial), keep_steps=[8])
  os.remove(partial / "checkpoints" / "8" / "commit_success.txt")
  with pytest.raises(trainer.TrainingError, match="has no committed checkpoint"):
    trainer.train(_cfg(env, **{"teacher.source": "workdir", "teacher.path": str(partial)}), str(workdir))
  # A Hugging Face teacher directory that does not exist is named before any work.
  cfg = _cfg(env, **{"teacher.source": "hf", "teacher.path": str(tmp_path / "no_such_model")})
  with pytest.raises(ValueError, match="no_such_model"):
    trainer.train(cfg, str(workdir))


# ---- exit codes ---------------------------------------------------------------------------------


def test_cli_exit_codes(env, tmp_path, monkeypatch):
  from absl import flags
  from ddk_jax import main

  config = tiny_run.write_config_file(str(tmp_path / "c.py"), env["assets"])
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["ddk_jax.main", f"--config={config}", f"--workdir={tmp_path / 'w'}"])
  outcomes = [
      (trainer.NonFiniteError("nan"), 3),
      (checkpointing.CheckpointError("disk full"), 4),
      (checkpointing.IncompatibleCheckpointError("v2"), 4),
      (trainer.TrainingError("config changed"), 2),
      ({"status": "preempted", "step": 3}, 143),
  ]
  try:
    for outcome, code in outcomes:
      def fake_train(cfg, workdir, allow_config_change=False, _o=outcome):
        if isinstance(_o, BaseException):
          raise _o
        return _o
      monkeypatch.setattr(trainer, "train", fake_train)
      with pytest.raises(SystemExit) as e:
        main._main(["ddk_jax.main"])
      assert e.value.code == code, outcome
  finally:
    flags.FLAGS.unparse_flags()
