"""How a run starts JAX's distributed runtime (ddk_jax.multihost).

The decision is a pure function of the environment, checked over simulated machines; the
explicit-coordinator path is also run for real with two local CPU processes on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ddk_jax import multihost

REPO = Path(__file__).resolve().parents[1]

SLURM_4 = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
           "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}

# (id, env, TPU device files present, expected kind, expected explicit (address, count, id) or None)
DECISIONS = [
    ("single-host", {}, False, "none", None),
    ("single-host-unrelated-vars", {"HOME": "/root", "CUDA_VISIBLE_DEVICES": "0,1"}, False, "none", None),
    ("tpu-slice-devices-only", {}, True, "tpu-auto", None),
    ("tpu-slice-accelerator-type", {"TPU_ACCELERATOR_TYPE": "v4-32"}, True, "tpu-auto", None),
    ("tpu-slice-v5e", {"TPU_ACCELERATOR_TYPE": "v5litepod-16"}, False, "tpu-auto", None),
    ("tpu-slice-worker-id", {"TPU_WORKER_ID": "3"}, True, "tpu-auto", None),
    ("tpu-slice-hostnames", {"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1,t-w-2,t-w-3"}, True, "tpu-auto", None),
    ("tpu-slice-process-addresses", {"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, False, "tpu-auto",
     None),
    ("tpu-task-id-unknown-size", {"CLOUD_TPU_TASK_ID": "0"}, False, "tpu-auto", None),
    ("tpu-worker0-unknown-size", {"TPU_WORKER_ID": "0"}, True, "tpu-auto", None),
    ("tpu-multislice", {"MEGASCALE_NUM_SLICES": "2", "TPU_WORKER_HOSTNAMES": "t-w-0"}, True, "tpu-auto", None),
    ("tpu-one-worker-hostnames", {"TPU_WORKER_HOSTNAMES": "t-w-0"}, True, "none", None),
    ("tpu-one-worker-v4-8", {"TPU_ACCELERATOR_TYPE": "v4-8", "TPU_WORKER_ID": "0"}, True, "none", None),
    ("tpu-one-worker-v6e-8", {"TPU_ACCELERATOR_TYPE": "v6e-8"}, True, "none", None),
    ("tpu-one-worker-forced", {"DDK_DISTRIBUTED": "1", "TPU_WORKER_HOSTNAMES": "t-w-0"}, True, "tpu-auto", None),
    ("forced-off-beats-everything", {"DDK_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "a,b", **SLURM_4,
                                     "DDK_COORDINATOR": "h:1"}, True, "none", None),
    ("forced-off-spelled-false", {"DDK_DISTRIBUTED": "False"}, True, "none", None),
    ("slurm-multi-task", SLURM_4, False, "slurm", None),
    ("slurm-one-task", {**SLURM_4, "SLURM_NTASKS": "1"}, False, "none", None),
    ("slurm-with-jax-coordinator", {**SLURM_4, "JAX_COORDINATOR_ADDRESS": "node001:9999"}, False, "slurm", None),
    ("open-mpi", {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "1",
                  "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911"}, False, "open-mpi", None),
    ("open-mpi-one-rank", {"OMPI_COMM_WORLD_SIZE": "1"}, False, "none", None),
    ("explicit-ddk", {"DDK_COORDINATOR": "10.0.0.2:8476", "DDK_NUM_PROCESSES": "4", "DDK_PROCESS_ID": "3"}, False,
     "explicit", ("10.0.0.2:8476", 4, 3)),
    ("explicit-ddk-ipv6", {"DDK_COORDINATOR": "[fd00::2]:8476", "DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "0"},
     False, "explicit", ("[fd00::2]:8476", 2, 0)),
    ("explicit-one-process", {"DDK_COORDINATOR": "127.0.0.1:1234", "DDK_NUM_PROCESSES": "1",
                              "DDK_PROCESS_ID": "0"}, False, "explicit", ("127.0.0.1:1234", 1, 0)),
    ("explicit-jax-names", {"JAX_COORDINATOR_ADDRESS": "gpu0:1234", "JAX_NUM_PROCESSES": "2",
                            "JAX_PROCESS_ID": "1"}, False, "explicit", ("gpu0:1234", 2, 1)),
    ("explicit-beats-slurm-and-tpu", {**SLURM_4, "TPU_WORKER_HOSTNAMES": "a,b", "DDK_COORDINATOR": " h:5 ",
                                      "DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "1"}, True, "explicit",
     ("h:5", 2, 1)),
    ("explicit-ddk-beats-jax", {"DDK_COORDINATOR": "a:1", "DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "0",
                                "JAX_COORDINATOR_ADDRESS": "b:2", "JAX_NUM_PROCESSES": "8",
                                "JAX_PROCESS_ID": "7"}, False, "explicit", ("a:1", 2, 0)),
    ("forced-on-no-cluster", {"DDK_DISTRIBUTED": "1"}, False, "jax-auto", None),
    ("auto-spelled-out", {"DDK_DISTRIBUTED": "auto"}, False, "none", None),
]


@pytest.mark.parametrize("env,tpu,kind,explicit", [c[1:] for c in DECISIONS], ids=[c[0] for c in DECISIONS])
def test_plan_start_decisions(env, tpu, kind, explicit):
  plan = multihost.plan_start(env, tpu_devices_present=tpu)
  assert plan.kind == kind, plan
  assert plan.starts == (kind != "none")
  assert plan.reason
  kwargs = plan.initialize_kwargs()
  if explicit:
    assert kwargs == dict(zip(("coordinator_address", "num_processes", "process_id"), explicit))
  else:
    assert kwargs == {}  # JAX detects the slice / cluster itself (as with jax.distributed.initialize())


BROKEN = [
    ("ddk-coordinator-only", {"DDK_COORDINATOR": "h:1"},
     r"DDK_NUM_PROCESSES and DDK_PROCESS_ID are not set.*Set DDK_NUM_PROCESSES to the number of processes"),
    ("ddk-id-missing", {"DDK_COORDINATOR": "h:1", "DDK_NUM_PROCESSES": "2"},
     r"DDK_PROCESS_ID is not set.*DDK_PROCESS_ID to this process's index"),
    ("ddk-count-missing", {"DDK_COORDINATOR": "h:1", "DDK_PROCESS_ID": "0"}, r"DDK_NUM_PROCESSES is not set"),
    ("ddk-coordinator-missing", {"DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "0"},
     r"DDK_COORDINATOR is not set.*host:port of process 0"),
    ("ddk-count-not-int", {"DDK_COORDINATOR": "h:1", "DDK_NUM_PROCESSES": "two", "DDK_PROCESS_ID": "0"},
     r"DDK_NUM_PROCESSES='two' is not an integer"),
    ("ddk-id-not-int", {"DDK_COORDINATOR": "h:1", "DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "0.5"},
     r"DDK_PROCESS_ID='0.5' is not an integer"),
    ("ddk-id-out-of-range", {"DDK_COORDINATOR": "h:1", "DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "2"},
     r"DDK_PROCESS_ID=2 is out of range for DDK_NUM_PROCESSES=2: process ids are 0 \.\. 1"),
    ("ddk-id-negative", {"DDK_COORDINATOR": "h:1", "DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "-1"},
     r"DDK_PROCESS_ID=-1 is out of range"),
    ("ddk-count-zero", {"DDK_COORDINATOR": "h:1", "DDK_NUM_PROCESSES": "0", "DDK_PROCESS_ID": "0"},
     r"DDK_NUM_PROCESSES=0 must be at least 1"),
    ("ddk-coordinator-no-port", {"DDK_COORDINATOR": "10.0.0.2", "DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "0"},
     r"DDK_COORDINATOR='10.0.0.2' is not host:port"),
    ("ddk-coordinator-bad-port", {"DDK_COORDINATOR": "h:99999", "DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "0"},
     r"DDK_COORDINATOR='h:99999' is not host:port"),
    ("jax-count-only", {"JAX_NUM_PROCESSES": "2"}, r"JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID are not set"),
    ("jax-address-only", {"JAX_COORDINATOR_ADDRESS": "h:1"}, r"JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"),
    ("switch-typo", {"DDK_DISTRIBUTED": "maybe"}, r"DDK_DISTRIBUTED='maybe' is not understood; use 0"),
    ("timeout-not-int", {"DDK_DISTRIBUTED_TIMEOUT": "5m"}, r"DDK_DISTRIBUTED_TIMEOUT='5m' is not an integer"),
    ("timeout-zero", {"DDK_DISTRIBUTED_TIMEOUT": "0"}, r"DDK_DISTRIBUTED_TIMEOUT=0 must be a positive"),
    ("slurm-without-srun", {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"},
     r"SLURM_NTASKS=4 but SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID are not set.*srun"),
    ("slurm-ntasks-not-int", {"SLURM_NTASKS": "four"}, r"SLURM_NTASKS='four' is not an integer"),
    ("open-mpi-5", {"OMPI_COMM_WORLD_SIZE": "2"}, r"OMPI_MCA_orte_hnp_uri is not set.*JAX_COORDINATOR_ADDRESS"),
]


@pytest.mark.parametrize("env,message", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_plan_start_rejects_broken_settings(env, message):
  with pytest.raises(ValueError, match=message):
    multihost.plan_start(env, tpu_devices_present=False)


def test_timeout_is_passed_to_jax():
  env = {"DDK_COORDINATOR": "h:1", "DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "0", "DDK_DISTRIBUTED_TIMEOUT": "45"}
  assert multihost.plan_start(env).initialize_kwargs()["initialization_timeout"] == 45
  assert multihost.plan_start({**SLURM_4, "DDK_DISTRIBUTED_TIMEOUT": "45"}).initialize_kwargs() == {
      "initialization_timeout": 45}


@pytest.mark.parametrize("name,hosts", [("v4-8", 1), ("v4-16", 2), ("v4-128", 16), ("v2-8", 1), ("v3-32", 4),
                                        ("v5p-8", 1), ("v5p-256", 32), ("v5litepod-1", 1), ("v5litepod-8", 1),
                                        ("v5litepod-16", 4), ("v6e-4", 1), ("v6e-256", 64), ("V4-32", 4),
                                        ("tpu7x-64", None), ("v4", None), ("", None), ("v4-0", None)])
def test_hosts_for_accelerator_type(name, hosts):
  assert multihost.hosts_for_accelerator_type(name) == hosts


def test_has_tpu_devices(tmp_path):
  assert not multihost.has_tpu_devices(str(tmp_path))
  (tmp_path / "vfio").mkdir()
  (tmp_path / "vfio" / "vfio").touch()  # the VFIO control node alone: not a TPU
  assert not multihost.has_tpu_devices(str(tmp_path))
  (tmp_path / "vfio" / "0").touch()  # v5e and newer
  assert multihost.has_tpu_devices(str(tmp_path))
  other = tmp_path / "other"
  other.mkdir()
  (other / "accel0").touch()  # v2-v4
  assert multihost.has_tpu_devices(str(other))


class _Recorder:

  def __init__(self, error: Exception | None = None):
    self.calls, self.error = [], error

  def __call__(self, **kwargs):
    self.calls.append(kwargs)
    if self.error:
      raise self.error


def test_initialize_single_host_calls_nothing_and_logs_one_line(caplog):
  start = _Recorder()
  with caplog.at_level(logging.INFO, logger="ddk_jax"):
    plan = multihost.initialize({}, tpu_devices_present=False, start=start)
  assert plan.kind == "none" and start.calls == []
  lines = [r.getMessage() for r in caplog.records if "multi-host start" in r.getMessage()]
  assert lines == ["multi-host start: single process, jax.distributed not started (no multi-host environment detected)"]


def test_initialize_applies_explicit_plan(caplog):
  start = _Recorder()
  env = {"DDK_COORDINATOR": "10.0.0.2:8476", "DDK_NUM_PROCESSES": "4", "DDK_PROCESS_ID": "1"}
  with caplog.at_level(logging.INFO, logger="ddk_jax"):
    plan = multihost.initialize(env, tpu_devices_present=False, start=start)
  assert start.calls == [{"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 1}]
  assert plan.kind == "explicit"
  [line] = [r.getMessage() for r in caplog.records if "multi-host start" in r.getMessage()]
  assert "explicit" in line and "process_id=1" in line and "DDK_COORDINATOR" in line


def test_initialize_tpu_slice_calls_initialize_without_arguments():
  start = _Recorder()
  plan = multihost.initialize({}, tpu_devices_present=True, start=start)
  assert plan.kind == "tpu-auto" and start.calls == [{}]


def test_initialize_explains_failed_auto_detection():
  start = _Recorder(ValueError("coordinator_address should be defined."))
  with pytest.raises(ValueError, match=r"tpu-auto.*coordinator_address should be defined.*DDK_DISTRIBUTED=0.*\[tpu\]"):
    multihost.initialize({}, tpu_devices_present=True, start=start)
  # An explicit plan's error from JAX is passed on as it is.
  start = _Recorder(ValueError("bad"))
  env = {"DDK_COORDINATOR": "h:1", "DDK_NUM_PROCESSES": "2", "DDK_PROCESS_ID": "0"}
  with pytest.raises(ValueError, match="^bad$"):
    multihost.initialize(env, tpu_devices_present=False, start=start)


def test_initialize_or_exit_exits_2(monkeypatch, caplog):
  monkeypatch.setenv("DDK_COORDINATOR", "h:1")
  for name in ("DDK_NUM_PROCESSES", "DDK_PROCESS_ID", "DDK_DISTRIBUTED"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(SystemExit) as e:
    multihost.initialize_or_exit()
  assert e.value.code == 2
  assert any("DDK_NUM_PROCESSES" in r.getMessage() for r in caplog.records)


def _clean_env(**extra: str) -> dict[str, str]:
  prefixes = ("DDK_", "JAX_", "SLURM_", "OMPI_", "TPU_", "CLOUD_TPU", "MEGASCALE_")
  env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
  env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.parametrize("argv", [["-m", "ddk_jax.main", "--config=configs/demo.py", "--workdir=/nonexistent/w"],
                                  ["-m", "ddk_jax.export", "--workdir=/nonexistent", "--out=/nonexistent/out"]],
                         ids=["main", "export"])
def test_entry_points_exit_2_on_half_set_variables(argv):
  env = _clean_env(DDK_COORDINATOR="127.0.0.1:1", DDK_PROCESS_ID="0")
  p = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2, p.stdout + p.stderr
  assert "DDK_NUM_PROCESSES is not set" in p.stderr
  assert "Traceback" not in p.stderr


_WORKER = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ddk_jax import multihost
    plan = multihost.initialize()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    assert plan.kind == "explicit", plan
    gathered = multihost_utils.process_allgather(np.array([10 * (jax.process_index() + 1)], np.int32))
    total = int(np.asarray(gathered).sum())
    print("RESULT", jax.process_index(), jax.process_count(), sorted(np.asarray(gathered).ravel().tolist()), total,
          flush=True)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_local_processes_start_from_explicit_variables():
  port = _free_port()
  procs = []
  for pid in range(2):
    env = _clean_env(DDK_COORDINATOR=f"127.0.0.1:{port}", DDK_NUM_PROCESSES="2", DDK_PROCESS_ID=str(pid),
                     DDK_DISTRIBUTED_TIMEOUT="60")
    procs.append(subprocess.Popen([sys.executable, "-c", _WORKER], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  deadline = time.monotonic() + 120
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  except subprocess.TimeoutExpired:
    pytest.fail("two-process start hung (> 120 s)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, (p, text) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, text
    assert f"RESULT {pid} 2 [10, 20] 30" in text, text
    assert f"multi-host start: explicit: jax.distributed.initialize(coordinator_address='127.0.0.1:{port}', " \
           f"num_processes=2, process_id={pid})" in text, text
