"""Exact resume of `python -m ddk_jax.main` after real signals, in subprocesses.

* One process on the emulated 8-device mesh (2 x 2 x 2), the reference config of
  tiny_run.REFERENCE: the same command run three times in one workdir (SIGTERM after step
  2: it saves and exits 143; SIGKILL after step 5: no warning, the async save in flight
  may or may not have committed and the steps after the last committed one are redone;
  then to the end), compared with the session's uninterrupted in-process reference run.
  Then a changed model key on the same workdir: exit 2, naming the key.
* Two processes (jax.distributed, gloo), one CPU device each, params and batch sharded
  over both (fsdp = 2: each host writes and restores its own shards and its own data
  state): an uninterrupted run against one preempted with SIGTERM (to one process only:
  JAX's preemption service makes both stop at the same step) and resumed.

Per-step losses (all of metrics.jsonl but timings), domain weights (controller history),
the data iterator states and the final params/optimizer state must be bit-identical.
Subprocesses share the persistent compilation cache of the in-process tests.
"""

import json
import os
import signal
import subprocess

import pytest

import tiny_run

# Compared with the reference run on the 2 x 2 x 2 mesh of the default 8-device session.
pytestmark = pytest.mark.devices(8)

TIMEOUT = 300
TWO_PROCESS = {"steps": 8, "ddk.interval": 4, "checkpoint.every": 3,
               "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 1}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tiny_run.shared_root(tmp_path_factory)
  cache = os.path.join(root, "jax_cache")
  with tiny_run.compilation_cache(cache):
    assets = tiny_run.shared_assets(root)
    yield {"root": root, "assets": assets, "cache": cache, "ref": tiny_run.reference_run(root, assets)}


def _wait(proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> int:
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f"{what} did not finish in {timeout} s")


def _log(path: str) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-6000:]


def _assert_same_run(workdir: str, ref: str, step: int, processes: int = 1) -> None:
  assert tiny_run.comparable_metrics(workdir) == tiny_run.comparable_metrics(ref)
  kinds = [r["kind"] for r in tiny_run.metrics(workdir)]
  assert kinds.count("teacher_eval") == 1 and kinds.count("train") == step
  state, meta = tiny_run.read_checkpoint(workdir, step)
  ref_state, ref_meta = tiny_run.read_checkpoint(ref, step)
  tiny_run.assert_same_state(state, ref_state)
  assert meta["controller"] == ref_meta["controller"]  # r, cached teacher losses, history
  for p in range(processes):
    name = os.path.join("checkpoints", str(step), "data", f"process_{p}-of-{processes}.json")
    with open(os.path.join(workdir, name)) as f, open(os.path.join(ref, name)) as g:
      assert json.load(f) == json.load(g)


def test_sigterm_and_sigkill_then_resume_is_bit_identical_then_a_config_change_is_refused(env, tmp_path):
  steps = tiny_run.REFERENCE["steps"]
  config = tiny_run.write_config_file(str(tmp_path / "config.py"), env["assets"], **tiny_run.REFERENCE)
  penv = tiny_run.env_for(8, cache_dir=env["cache"])
  run, log = str(tmp_path / "run"), str(tmp_path / "run.log")
  proc = None
  try:
    # 1. SIGTERM after step 2: the run stops after its current step, saves it, exits 143.
    proc = tiny_run.start(config, run, env=penv, log_path=log)
    tiny_run.wait_for_train_step(run, 2, proc, timeout=TIMEOUT)
    proc.send_signal(signal.SIGSTOP)  # freeze it where it is, so the signal lands mid-run
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    assert _wait(proc, "the SIGTERM'd run") == 143, _log(log)
    stopped = max(r["step"] for r in tiny_run.metrics(run) if r["kind"] == "train")
    assert 2 <= stopped < steps, "the run finished before SIGTERM arrived"
    assert tiny_run.committed_steps(run)[-1] == stopped
    assert f"checkpoint of step {stopped} saved after SIGTERM" in _log(log)

    # 2. The same command resumes; SIGKILL after step 5.
    proc = tiny_run.start(config, run, env=penv, log_path=log)
    tiny_run.wait_for_train_step(run, max(5, stopped + 1), proc, timeout=TIMEOUT)
    proc.send_signal(signal.SIGKILL)
    assert _wait(proc, "the SIGKILL'd run") == -signal.SIGKILL, _log(log)
    assert f"resumed from {run}/checkpoints at step {stopped}" in _log(log)
    assert max(r["step"] for r in tiny_run.metrics(run) if r["kind"] == "train") < steps, \
        "the run finished before SIGKILL arrived"

    # 3. The same command again: resumes from the last committed step and finishes.
    last = tiny_run.committed_steps(run)[-1]
    proc = tiny_run.start(config, run, env=penv, log_path=log)
    assert _wait(proc, "the resumed run") == 0, _log(log)
    assert f"at step {last}" in _log(log).rsplit("resumed from", 1)[-1]
  finally:
    if proc is not None and proc.poll() is None:
      proc.kill()
  _assert_same_run(run, env["ref"], steps)

  # 4. A key that would change the experiment: exit 2 naming it; the checkpoints untouched.
  before = tiny_run.committed_steps(run)
  changed = tiny_run.run(config, run, "--config.student.model.num_layers=2", env=penv, timeout=TIMEOUT)
  assert changed.returncode == 2, changed.stderr[-4000:]
  assert "student.model.num_layers" in changed.stderr and "--allow_config_change" in changed.stderr
  assert tiny_run.committed_steps(run) == before


def _start_pair(config, workdir, port, cache, logs):
  procs = []
  for pid in range(2):
    env = tiny_run.env_for(1, cache_dir=cache, DDK_COORDINATOR=f"127.0.0.1:{port}", DDK_NUM_PROCESSES="2",
                           DDK_PROCESS_ID=str(pid))
    procs.append(tiny_run.start(config, workdir, env=env, log_path=f"{logs}.p{pid}.log"))
  return procs


def test_two_processes_preempted_and_resumed_is_bit_identical(env, tmp_path):
  config = tiny_run.write_config_file(str(tmp_path / "config.py"), env["assets"], **TWO_PROCESS)
  steps = TWO_PROCESS["steps"]
  ref, run = str(tmp_path / "reference"), str(tmp_path / "run")
  # The uninterrupted pair runs alongside the preempted one (each pair idles while one of
  # its processes compiles).
  ref_procs = _start_pair(config, ref, tiny_run.free_port(), env["cache"], str(tmp_path / "reference"))
  procs = []
  try:
    # SIGTERM to process 1 only, after step 3: both processes agree on a step, save it, exit 143.
    procs = _start_pair(config, run, tiny_run.free_port(), env["cache"], str(tmp_path / "run1"))
    tiny_run.wait_for_train_step(run, 3, procs[0], timeout=TIMEOUT)
    procs[1].send_signal(signal.SIGTERM)
    for i, p in enumerate(procs):
      assert _wait(p, "preempted process") == 143, _log(str(tmp_path / f"run1.p{i}.log"))
    stopped = tiny_run.committed_steps(run)[-1]
    assert 3 <= stopped < steps, "the run finished before SIGTERM arrived"
    assert max(r["step"] for r in tiny_run.metrics(run) if r["kind"] == "train") == stopped
    # The same command on both processes resumes and finishes.
    procs = _start_pair(config, run, tiny_run.free_port(), env["cache"], str(tmp_path / "run2"))
    for i, p in enumerate(procs):
      assert _wait(p, "resumed process") == 0, _log(str(tmp_path / f"run2.p{i}.log"))
    assert f"at step {stopped}" in _log(str(tmp_path / "run2.p0.log"))
    for i, p in enumerate(ref_procs):
      assert _wait(p, "reference process") == 0, _log(str(tmp_path / f"reference.p{i}.log"))
  finally:
    for p in ref_procs + procs:
      if p.poll() is None:
        p.kill()
  _assert_same_run(run, ref, steps, processes=2)
