"""Checkpoints in-process on the emulated 8-device mesh (data x fsdp x tensor = 2 x 2 x 2):
what a step holds, exact resume after a real SIGTERM, keep policy, config changes on resume,
damaged and incompatible checkpoints.

Every run here is compared with one uninterrupted reference run (tiny_run.REFERENCE);
a persistent compilation cache lets the repeated runs skip XLA compilation.
"""

import json
import logging
import os
import shutil
import signal

import pytest

import tiny_run
from ddk_jax import checkpointing, resume_policy, run_setup, trainer
from ddk_jax import train_step as ts

# Compared with the reference run on the 2 x 2 x 2 mesh of the default 8-device session.
pytestmark = pytest.mark.devices(8)



@pytest.fixture(scope="module")
def env(tmp_path_factory):
  with tiny_run.reference_env(tmp_path_factory, "checkpoint") as e:
    yield e


_cfg = tiny_run.reference_config


def _copy(env, name, **kw):
  return tiny_run.copy_run(env["ref"], os.path.join(env["tmp"], name), **kw)


def _assert_same_run(workdir, ref, step=8):
  """metrics.jsonl (all rows but timings), final state and controller history are identical."""
  assert tiny_run.comparable_metrics(workdir) == tiny_run.comparable_metrics(ref)
  state, meta = tiny_run.read_checkpoint(workdir, step)
  ref_state, ref_meta = tiny_run.read_checkpoint(ref, step)
  tiny_run.assert_same_state(state, ref_state)
  assert meta["controller"] == ref_meta["controller"]
  with open(os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")) as f, \
      open(os.path.join(ref, "checkpoints", str(step), "data", "process_0-of-1.json")) as g:
    assert json.load(f) == json.load(g)


def test_a_step_holds_everything_the_run_needs(env):
  ref = env["ref"]
  assert tiny_run.committed_steps(ref) == [2, 4, 6, 8]
  assert sorted(os.listdir(os.path.join(ref, "checkpoints", "8"))) == [
      "_CHECKPOINT_METADATA", "commit_success.txt", "data", "meta", "state"]
  state, meta = tiny_run.read_checkpoint(ref, 8)
  assert sorted(state) == ["opt_state", "params", "skipped_steps", "step"]
  assert int(state["step"]) == 8 and int(state["skipped_steps"]) == 0
  assert meta["format_version"] == checkpointing.FORMAT_VERSION and meta["step"] == 8
  controller = meta["controller"]
  assert [h["step"] for h in controller["history"]] == [0, 3, 6]
  assert len(controller["weights"]) == 3 and controller["teacher_losses"] is not None
  assert meta["config"] == run_setup.resolved_config_dict(_cfg(env))
  assert meta["runtime"] == {"num_processes": 1, "num_devices": 8,
                             "mesh_shape": {"data": 2, "fsdp": 2, "tensor": 2}}
  assert meta["log_state"]["metrics_bytes"] == os.path.getsize(os.path.join(ref, "metrics.jsonl"))
  assert meta["log_state"]["final_student_losses"] is not None
  assert "no random numbers" in meta["rng"]["note"]
  with open(os.path.join(ref, "checkpoints", "8", "data", "process_0-of-1.json")) as f:
    data_state = json.load(f)
  assert data_state["counter"] == 8 * 8  # rows drawn: steps x global batch
  assert data_state["weights"] == controller["weights"]
  # The step-6 checkpoint was saved before the DDK update at step 6 ran.
  _, meta6 = tiny_run.read_checkpoint(ref, 6)
  assert [h["step"] for h in meta6["controller"]["history"]] == [0, 3]


def test_sigterm_then_resume_is_bit_identical_on_the_8_device_mesh(env, monkeypatch):
  """A real SIGTERM (to this process) after step 5; the run saves step 5 and returns
  'preempted'; the same call resumes.  Also a different keep policy (last 2 + every 4th),
  which must not change what is computed."""
  workdir = os.path.join(env["tmp"], "sigterm")
  cfg = _cfg(env, **{"checkpoint.keep": 2, "checkpoint.keep_period": 4})
  real_jit = ts.jit_train_step

  def jit_then_signal(*args, **kwargs):
    step_fn = real_jit(*args, **kwargs)
    calls = []

    def wrapped(*a):
      out = step_fn(*a)
      calls.append(1)
      if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    return wrapped

  monkeypatch.setattr(ts, "jit_train_step", jit_then_signal)
  handler_before = signal.getsignal(signal.SIGTERM)
  summary = trainer.train(cfg, workdir)
  assert summary == {"status": "preempted", "step": 5}
  assert tiny_run.committed_steps(workdir) == [4, 5]  # last 2 (4, 5); 2 was dropped
  assert max(r["step"] for r in tiny_run.metrics(workdir)) == 5
  assert signal.getsignal(signal.SIGTERM) == handler_before  # the trainer's handler is gone again

  monkeypatch.setattr(ts, "jit_train_step", real_jit)
  assert trainer.train(cfg, workdir)["status"] == "done"
  assert tiny_run.committed_steps(workdir) == [4, 6, 8]  # last 2 plus every 4th
  _assert_same_run(workdir, env["ref"])


# ---- config changes on resume ---------------------------------------------------------------


def _other_tokenizer_path(env):
  with open(os.path.join(env["assets"], "assets.json")) as f:
    tok = json.load(f)["tokenizer"]
  other = os.path.join(env["tmp"], "tok_copy")
  if not os.path.exists(other):
    shutil.copytree(tok, other)
  return other


@pytest.mark.parametrize("overrides,key", [
    ({"student.model.hidden_size": 64, "student.model.intermediate_size": 64}, "student.model.hidden_size"),
    ({"teacher.model.num_layers": 1}, "teacher.model.num_layers"),
    ({"data.seq_len": 64}, "data.seq_len"),
    ({"mesh.data": 4, "mesh.fsdp": 2, "mesh.tensor": 1}, "mesh.data"),
    ({"optimizer.learning_rate": 1e-3}, "optimizer.learning_rate"),
    ({"tokenizer": None}, "data.tokenizer"),
    ({"domains": None}, "data.domains"),
])
def test_resume_refuses_a_config_change_naming_the_key(env, overrides, key):
  workdir = _copy(env, f"refuse_{key}")
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  cfg = _cfg(env)
  with cfg.unlocked():
    for k, v in overrides.items():
      if k in ("tokenizer", "domains"):  # prepared into a directory of its own
        cfg.data.prepared_dir = os.path.join(env["tmp"], f"prepared_{k}")
      if k == "tokenizer":
        cfg.data.tokenizer = _other_tokenizer_path(env)
      elif k == "domains":
        cfg.data.domains = cfg.data.domains[:2]
      else:
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
          node = node[p]
        node[leaf] = v
  with pytest.raises(trainer.TrainingError, match="allow_config_change") as e:
    trainer.train(cfg, workdir)
  assert key in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing touched


def test_resume_refuses_a_mesh_of_another_size(env):
  """The checkpoint says it was written on 16 devices (as if by a bigger slice)."""
  workdir = _copy(env, "mesh_size")
  meta_path = os.path.join(workdir, "checkpoints", "8", "meta", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  meta["runtime"]["num_devices"] = 16
  meta["runtime"]["mesh_shape"]["data"] = 4
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(trainer.TrainingError, match="num_devices: 16 -> 8"):
    trainer.train(_cfg(env), workdir)


def test_resume_accepts_cadence_and_length_changes(env):
  """steps, logging, eval and checkpoint cadence may change: the run continues from 8 to 10."""
  workdir = _copy(env, "accept")
  cfg = _cfg(env, steps=10, **{"logging.every": 2, "eval.every": 4, "checkpoint.every": 3,
                               "checkpoint.keep": 3})
  summary = trainer.train(cfg, workdir)
  assert summary["status"] == "done" and summary["step"] == 10
  rows = tiny_run.comparable_metrics(workdir)
  ref_rows = tiny_run.comparable_metrics(env["ref"])
  assert rows[:len(ref_rows)] == ref_rows  # the first 8 steps are untouched
  new = rows[len(ref_rows):]
  # DDK update at 9 (K=3) with the training-batch means beside its validation, a train row every
  # 2 steps now, the final eval at 10.
  assert [(r["kind"], r["step"]) for r in new] == [("eval", 9), ("signal", 9), ("weights", 9), ("train", 10),
                                                   ("eval", 10)]
  assert tiny_run.committed_steps(workdir) == [8, 9, 10]  # keep=3 now (older steps dropped); every 3


def test_allow_config_change_overrides_the_refusal(env):
  workdir = _copy(env, "allow")
  cfg = _cfg(env, **{"optimizer.learning_rate": 1e-3})
  with pytest.raises(trainer.TrainingError, match="optimizer.learning_rate"):
    trainer.train(cfg, workdir)
  summary = trainer.train(cfg, workdir, allow_config_change=True)
  assert summary["status"] == "done"  # the run was already finished: report only
  assert tiny_run.comparable_metrics(workdir) == tiny_run.comparable_metrics(env["ref"])
  # A model of another shape cannot continue the run, even when the change is allowed.
  cfg = _cfg(env, **{"student.model.hidden_size": 64, "student.model.intermediate_size": 64})
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"other shapes .*params/embed: saved \(400, 32\), now \(400, 64\).*new --workdir"):
    trainer.train(cfg, workdir, allow_config_change=True)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6", "8"]


def test_config_change_classification():
  saved = {"steps": 10, "logging": {"every": 1}, "eval": {"every": 0}, "checkpoint": {"every": 5},
           "optimizer": {"learning_rate": 1e-3, "max_consecutive_skips": 10}, "data": {"seq_len": 32}}
  current = json.loads(json.dumps(saved))
  current.update(steps=20, logging={"every": 5}, eval={"every": 10}, checkpoint={"every": 7})
  current["optimizer"]["max_consecutive_skips"] = 0
  assert resume_policy.config_changes(saved, current) == []
  assert set(resume_policy.resumable_changes(saved, current)) == {
      "steps", "logging.every", "eval.every", "checkpoint.every", "optimizer.max_consecutive_skips"}
  current["data"]["seq_len"] = 64
  current["optimizer"]["learning_rate"] = 2e-3
  assert resume_policy.config_changes(saved, current) == ["data.seq_len", "optimizer.learning_rate"]


def test_keys_added_since_a_run_started_count_as_unchanged_at_their_default():
  saved = {"loss": {"gamma": 1.0}}
  current = {"loss": {"gamma": 1.0, "divergence": "forward_kl"}}  # the default of a newer key
  assert resume_policy.config_changes(saved, current) == []
  current["loss"]["divergence"] = "reverse_kl"
  assert resume_policy.config_changes(saved, current) == ["loss.divergence"]
  assert resume_policy.runtime_changes({"num_processes": 2, "num_devices": 8, "mesh_shape": {"data": 8}},
                                       {"num_processes": 1, "num_devices": 8, "mesh_shape": {"data": 8}}) == [
      "number of processes (num_processes: 2 -> 1)"]


# ---- damaged and incompatible checkpoints -----------------------------------------------------


def _truncate_state_data(step_dir):
  n = 0
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(dirpath) == "d":
      for name in files:
        path = os.path.join(dirpath, name)
        os.truncate(path, os.path.getsize(path) // 2)
        n += 1
  assert n


def test_uncommitted_and_corrupted_steps_fall_back_to_the_previous_good_one(env, caplog):
  """Step 8 lost its commit marker (an interrupted copy), step 6's array files are
  truncated: the run warns, moves both aside (never deletes them), resumes from step 4 and
  ends bit-identical to the reference."""
  workdir = _copy(env, "damaged")
  ckpts = os.path.join(workdir, "checkpoints")
  os.remove(os.path.join(ckpts, "8", "commit_success.txt"))
  _truncate_state_data(os.path.join(ckpts, "6"))
  with caplog.at_level(logging.WARNING, logger="ddk_jax"):
    summary = trainer.train(_cfg(env), workdir)
  assert summary["status"] == "done"
  log = caplog.text
  assert "step 8" in log and "commit_success.txt" in log
  assert "checkpoint step 6" in log and "cannot be restored" in log
  assert "resumed from step 4" in log
  names = os.listdir(ckpts)
  assert any(n.startswith("8.unusable-") for n in names) and any(n.startswith("6.unusable-") for n in names)
  assert tiny_run.committed_steps(workdir) == [2, 4, 6, 8]
  _assert_same_run(workdir, env["ref"])


def test_no_restorable_checkpoint_says_how_to_proceed(env):
  workdir = _copy(env, "all_broken", keep_steps=[8])
  _truncate_state_data(os.path.join(workdir, "checkpoints", "8"))
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(checkpointing.CheckpointError, match=r"no checkpoint .* can be restored") as e:
    trainer.train(_cfg(env), workdir)
  assert "step 8:" in str(e.value) and "move" in str(e.value) and "aside" in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing moved


def test_checkpoint_of_an_incompatible_version(env):
  workdir = _copy(env, "version")
  meta_path = os.path.join(workdir, "checkpoints", "8", "meta", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  meta["format_version"] = 99
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r"format version 99, this ddk_jax reads version 1.*new --workdir"):
    trainer.train(_cfg(env), workdir)
  assert tiny_run.committed_steps(workdir) == [2, 4, 6, 8]


def test_rerunning_a_finished_run_changes_nothing(env):
  workdir = _copy(env, "rerun")
  summary = trainer.train(_cfg(env), workdir)
  assert summary["status"] == "done"
  with open(os.path.join(env["ref"], "summary.json")) as f:
    assert summary["student_final"] == json.load(f)["student_final"]
  assert tiny_run.comparable_metrics(workdir) == tiny_run.comparable_metrics(env["ref"])
  assert tiny_run.committed_steps(workdir) == [2, 4, 6, 8]


def test_a_checkpoint_beyond_steps_is_refused(env):
  workdir = _copy(env, "beyond")
  with pytest.raises(trainer.TrainingError, match=r"step 8, beyond steps=6"):
    trainer.train(_cfg(env, steps=6), workdir)
