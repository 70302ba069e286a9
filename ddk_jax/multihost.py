"""Deciding whether and how to start JAX's distributed runtime, and starting it.

Every entry point (`ddk_jax.main`, `ddk_jax.export`) calls `initialize_or_exit()` before
any JAX computation.  The decision is made by `plan_start(env, tpu_devices_present=...)`, a
pure function of the environment, in this order (first match wins):

1. `DDK_DISTRIBUTED=0` (or false/off/no): never start it (a single-process run).
2. Explicit coordinator: `DDK_COORDINATOR` + `DDK_NUM_PROCESSES` + `DDK_PROCESS_ID`, or the
   same trio spelled `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`.
   All three must be set and valid; a half-set trio is an error naming the missing one.
3. SLURM with more than one task (`SLURM_NTASKS > 1`, started with `srun`).
4. Open MPI with more than one rank (`mpirun`, `OMPI_COMM_WORLD_SIZE > 1`).
5. Cloud TPU VM: detected from `TPU_*` / `CLOUD_TPU_TASK_ID` / `MEGASCALE_*` variables or
   TPU device files (`/dev/accel*`, `/dev/vfio/<n>`).  When the environment says there is
   exactly one worker (`TPU_WORKER_HOSTNAMES` with one host, or an accelerator type such as
   `v4-8` / `v5litepod-8` / `v6e-8`), nothing is started.  Otherwise
   `jax.distributed.initialize()` is called without arguments and JAX reads the slice's
   workers from the TPU metadata itself; on a single-worker VM whose size is not known from
   the environment this starts a one-process runtime, which is harmless.
6. `DDK_DISTRIBUTED=1` with none of the above: `jax.distributed.initialize()` without
   arguments (JAX's own cluster detection).
7. Otherwise (a single host): nothing is called.

`DDK_DISTRIBUTED_TIMEOUT` (seconds) bounds how long processes wait for each other at start
(JAX's default: 300).

Invalid settings raise `ValueError` with a message naming the variable and the fix;
`initialize_or_exit()` turns that into a one-line error and exit status 2.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Mapping

log = logging.getLogger("ddk_jax")

EXIT_CONFIG = 2

NONE, EXPLICIT, SLURM, OPEN_MPI, TPU_AUTO, JAX_AUTO = "none", "explicit", "slurm", "open-mpi", "tpu-auto", "jax-auto"

# The explicit trio, in the two spellings accepted: (address, process count, process id).
_EXPLICIT_VARS = (("DDK_COORDINATOR", "DDK_NUM_PROCESSES", "DDK_PROCESS_ID"),
                  ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
# Variables Cloud TPU VMs / GKE TPU pods set; any of them marks a TPU host.
_TPU_ENV_MARKERS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                    "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES")
# What JAX's SLURM detection reads; a task started without `srun` lacks the step variables.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OFF, _ON = ("0", "false", "off", "no"), ("1", "true", "on", "yes")


@dataclasses.dataclass(frozen=True)
class StartPlan:
  """How to start the distributed runtime.  `kind` is one of none, explicit, slurm, open-mpi,
  tpu-auto, jax-auto; only `explicit` carries the coordinator, count and id (the others let
  JAX detect them)."""

  kind: str
  reason: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int | None = None

  @property
  def starts(self) -> bool:
    return self.kind != NONE

  def initialize_kwargs(self) -> dict[str, Any]:
    """Keyword arguments for `jax.distributed.initialize`."""
    kwargs: dict[str, Any] = {}
    if self.kind == EXPLICIT:
      kwargs.update(coordinator_address=self.coordinator_address, num_processes=self.num_processes,
                    process_id=self.process_id)
    if self.initialization_timeout is not None:
      kwargs["initialization_timeout"] = self.initialization_timeout
    return kwargs

  def describe(self) -> str:
    if self.kind == NONE:
      return f"single process, jax.distributed not started ({self.reason})"
    if self.kind == EXPLICIT:
      what = (f"jax.distributed.initialize(coordinator_address={self.coordinator_address!r}, "
              f"num_processes={self.num_processes}, process_id={self.process_id})")
    else:
      what = "jax.distributed.initialize() with JAX's own detection"
    return f"{self.kind}: {what} ({self.reason})"


# ------------------------------------------------------------------------------ detection


def has_tpu_devices(dev: str = "/dev") -> bool:
  """True when TPU chips are visible: /dev/accel<n> (TPU v2-v4) or /dev/vfio/<n> (v5e and newer).

  /dev/vfio/vfio alone (the VFIO control node many Linux hosts have) does not count.
  """
  return bool(glob.glob(os.path.join(dev, "accel[0-9]*")) or glob.glob(os.path.join(dev, "vfio", "[0-9]*")))


def hosts_for_accelerator_type(accelerator_type: str) -> int | None:
  """Workers (hosts) of a single TPU slice named like `v4-32`, `v5p-8`, `v5litepod-16`, `v6e-8`.

  v2/v3/v4/v5p sizes count TensorCores (8 per host); v5e/v6e sizes count chips (up to 8 on
  one host, 4 per host in larger slices).  Returns None for a name it does not know.
  """
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator_type.strip().lower())
  if not m:
    return None
  family, size = m.group(1), int(m.group(2))
  if size <= 0:
    return None
  if family in ("v2", "v3", "v4", "v5p"):
    return max(1, size // 8)
  return 1 if size <= 8 else size // 4


def _int_var(env: Mapping[str, str], name: str, fix: str) -> int:
  raw = env[name].strip()
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"{name}={env[name]!r} is not an integer; {fix}") from None


def _set(env: Mapping[str, str], name: str) -> bool:
  return bool(env.get(name, "").strip())


def _explicit_plan(env: Mapping[str, str], names: tuple[str, str, str], reason_extra: str,
                   timeout: int | None) -> StartPlan:
  addr_var, num_var, id_var = names
  missing = [n for n in names if not _set(env, n)]
  if missing:
    given = ", ".join(f"{n}={env[n]!r}" for n in names if _set(env, n))
    hints = {addr_var: f"{addr_var} to host:port of process 0 (the same on every host, e.g. 10.0.0.2:8476)",
             num_var: f"{num_var} to the number of processes in the job (the same on every host)",
             id_var: f"{id_var} to this process's index, 0 .. {num_var}-1 (different on every host)"}
    raise ValueError(
        f"{given} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: a multi-process "
        f"start needs all of {', '.join(names)}. Set " + "; ".join(hints[n] for n in missing) +
        f" -- or unset {', '.join(n for n in names if n not in missing)} for a single-process run.")
  address = env[addr_var].strip()
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{addr_var}={address!r} is not host:port; set it to the address of process 0 and a free "
                     "port, the same on every host, e.g. 10.0.0.2:8476 (or [fd00::2]:8476).")
  num = _int_var(env, num_var, f"set {num_var} to the number of processes in the job, e.g. 2.")
  if num < 1:
    raise ValueError(f"{num_var}={num} must be at least 1 (the number of processes in the job).")
  pid = _int_var(env, id_var, f"set {id_var} to this process's index, 0 .. {num - 1}.")
  if not 0 <= pid < num:
    raise ValueError(f"{id_var}={pid} is out of range for {num_var}={num}: process ids are 0 .. {num - 1}, "
                     "one per process.")
  return StartPlan(EXPLICIT, f"from {', '.join(names)}{reason_extra}", address, num, pid, timeout)


def plan_start(env: Mapping[str, str], *, tpu_devices_present: bool = False) -> StartPlan:
  """Decides how to start JAX's distributed runtime from `env` (see the module docstring).

  `tpu_devices_present`: whether TPU chips are visible on this machine (`has_tpu_devices()`).
  Raises ValueError, naming the variable and the fix, for a half-set or invalid setting.
  """
  switch = env.get("DDK_DISTRIBUTED", "").strip().lower()
  if switch not in _OFF + _ON + ("", "auto"):
    raise ValueError(f"DDK_DISTRIBUTED={env['DDK_DISTRIBUTED']!r} is not understood; use 0 (never start "
                     "jax.distributed), 1 (always start it) or auto (decide from the environment, the default).")
  if switch in _OFF:
    return StartPlan(NONE, "DDK_DISTRIBUTED=0")
  forced = switch in _ON

  timeout = None
  if _set(env, "DDK_DISTRIBUTED_TIMEOUT"):
    timeout = _int_var(env, "DDK_DISTRIBUTED_TIMEOUT", "set it to the seconds processes wait for each other, e.g. 300.")
    if timeout <= 0:
      raise ValueError(f"DDK_DISTRIBUTED_TIMEOUT={timeout} must be a positive number of seconds, e.g. 300.")

  # 2. Explicit coordinator (DDK_* first; JAX_* when any of its count/id is given).
  ddk_names, jax_names = _EXPLICIT_VARS
  if any(_set(env, n) for n in ddk_names):
    return _explicit_plan(env, ddk_names, "", timeout)
  if _set(env, "JAX_NUM_PROCESSES") or _set(env, "JAX_PROCESS_ID"):
    return _explicit_plan(env, jax_names, "", timeout)

  # 3. SLURM.
  if _set(env, "SLURM_NTASKS"):
    ntasks = _int_var(env, "SLURM_NTASKS", "it is set by SLURM; unset it or set DDK_DISTRIBUTED=0.")
    if ntasks > 1:
      missing = [n for n in _SLURM_VARS if not _set(env, n)]
      if missing:
        raise ValueError(
            f"SLURM_NTASKS={ntasks} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: start "
            "every task with `srun python -m ddk_jax.main ...` inside the allocation, or set DDK_DISTRIBUTED=0 to run "
            "this as one process.")
      return StartPlan(SLURM, f"SLURM_NTASKS={ntasks}, this is task {env['SLURM_PROCID'].strip()}",
                       initialization_timeout=timeout)

  # 4. Open MPI (mpirun / mpiexec).
  if _set(env, "OMPI_COMM_WORLD_SIZE"):
    size = _int_var(env, "OMPI_COMM_WORLD_SIZE", "it is set by mpirun; unset it or set DDK_DISTRIBUTED=0.")
    if size > 1:
      if not _set(env, "OMPI_MCA_orte_hnp_uri"):
        raise ValueError(
            f"OMPI_COMM_WORLD_SIZE={size} but OMPI_MCA_orte_hnp_uri is not set (an MPI launcher JAX cannot read, "
            "e.g. Open MPI 5): set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID for every rank, "
            "or set DDK_DISTRIBUTED=0 for a single process.")
      return StartPlan(OPEN_MPI, f"OMPI_COMM_WORLD_SIZE={size}", initialization_timeout=timeout)

  # 5. Cloud TPU VM.
  tpu_vars = [n for n in _TPU_ENV_MARKERS if _set(env, n)]
  if tpu_vars or tpu_devices_present:
    hosts_var = next((n for n in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES") if _set(env, n)), None)
    slices = env.get("MEGASCALE_NUM_SLICES", "").strip()
    if (slices and slices != "1") or _set(env, "MEGASCALE_COORDINATOR_ADDRESS"):
      return StartPlan(TPU_AUTO, "multi-slice TPU (MEGASCALE_*)", initialization_timeout=timeout)
    if hosts_var:
      hosts = [h for h in env[hosts_var].split(",") if h.strip()]
      if len(hosts) > 1:
        return StartPlan(TPU_AUTO, f"TPU slice with {len(hosts)} workers ({hosts_var})", initialization_timeout=timeout)
      if not forced:
        return StartPlan(NONE, f"TPU VM with one worker ({hosts_var})")
    worker_id = env.get("TPU_WORKER_ID", "").strip()
    if worker_id.isdigit() and int(worker_id) > 0:
      return StartPlan(TPU_AUTO, f"TPU worker {worker_id} of a multi-host slice (TPU_WORKER_ID)",
                       initialization_timeout=timeout)
    accel = env.get("TPU_ACCELERATOR_TYPE", "").strip()
    n_hosts = hosts_for_accelerator_type(accel) if accel else None
    if n_hosts is not None and n_hosts > 1:
      return StartPlan(TPU_AUTO, f"TPU slice {accel} with {n_hosts} workers (TPU_ACCELERATOR_TYPE)",
                       initialization_timeout=timeout)
    if n_hosts == 1 and not forced:
      return StartPlan(NONE, f"TPU VM {accel} with one worker (TPU_ACCELERATOR_TYPE)")
    seen = ", ".join(tpu_vars) if tpu_vars else "TPU devices in /dev"
    return StartPlan(TPU_AUTO, f"TPU VM ({seen}); JAX reads the slice's workers from the TPU metadata",
                     initialization_timeout=timeout)

  # 6./7.
  if forced:
    return StartPlan(JAX_AUTO, "DDK_DISTRIBUTED=1", initialization_timeout=timeout)
  if _set(env, "JAX_COORDINATOR_ADDRESS"):
    raise ValueError("JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES and JAX_PROCESS_ID are not, and no "
                     "cluster (SLURM, Open MPI, Cloud TPU) was detected to supply them: set both on every process, "
                     "or unset JAX_COORDINATOR_ADDRESS for a single-process run.")
  return StartPlan(NONE, "no multi-host environment detected")


# ------------------------------------------------------------------------------ starting


def initialize(env: Mapping[str, str] | None = None, *, tpu_devices_present: bool | None = None,
               start: Callable[..., Any] | None = None) -> StartPlan:
  """Decides (`plan_start`) and starts JAX's distributed runtime; logs one line saying what it did.

  Must run before any JAX computation.  `env` defaults to os.environ, `tpu_devices_present`
  to `has_tpu_devices()`, `start` to `jax.distributed.initialize`.  Returns the plan.
  Raises ValueError (variable + fix) for invalid settings or when JAX's own detection
  finds no cluster for a plan that relies on it.
  """
  env = os.environ if env is None else env
  if tpu_devices_present is None:
    tpu_devices_present = has_tpu_devices()
  plan = plan_start(env, tpu_devices_present=tpu_devices_present)
  if not plan.starts:
    log.info("multi-host start: %s", plan.describe())
    return plan
  if start is None:
    import jax
    if jax.distributed.is_initialized():
      log.info("multi-host start: jax.distributed was already initialized; %s not applied", plan.kind)
      return plan
    start = jax.distributed.initialize
  try:
    start(**plan.initialize_kwargs())
  except ValueError as e:
    if plan.kind == EXPLICIT:
      raise
    # JAX's detection found no cluster (e.g. a TPU-looking machine without the TPU build of JAX).
    raise ValueError(
        f"multi-host start ({plan.kind}: {plan.reason}) failed: {e}. If this is one machine, set DDK_DISTRIBUTED=0; "
        "on a Cloud TPU VM install the TPU build (pip install -e '.[tpu]'); otherwise set DDK_COORDINATOR, "
        "DDK_NUM_PROCESSES and DDK_PROCESS_ID on every process.") from e
  log.info("multi-host start: %s", plan.describe())
  return plan


def initialize_or_exit() -> StartPlan:
  """`initialize()` for command-line entry points: a ValueError is one error line and exit status 2."""
  try:
    return initialize()
  except ValueError as e:
    log.error("%s", e)
    sys.exit(EXIT_CONFIG)


def broadcast_json(obj: Any) -> Any:
  """Process 0's JSON-able `obj` on every process (itself when there is one process)."""
  import jax
  if jax.process_count() == 1:
    return obj
  import numpy as np
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.array([data.size], np.int32))[0])
  buf = np.zeros(size, np.int32)
  if jax.process_index() == 0:
    buf[:] = data
  buf = multihost_utils.broadcast_one_to_all(buf)
  return json.loads(np.asarray(buf, np.uint8).tobytes().decode())
