#!/usr/bin/env bash
# Runs a ddk_jax job on a TPU VM until it finishes: creates and sets up the TPU when
# needed, launches the job, and after a preemption recreates the TPU and runs the same
# command again (it resumes from the checkpoints in its gs:// workdir).
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MAX_RESTARTS=${DDK_TPU_MAX_RESTARTS:-5}
RETRY_SECONDS=${DDK_TPU_RETRY_SECONDS:-60}
RETRY_ON_FAILURE=0
SKIP_SETUP=0
TEARDOWN_AT_END=0
LOGS_DIR=${DDK_TPU_LOGS_DIR:-}
WAIT_TIMEOUT=${DDK_TPU_WAIT_TIMEOUT:-0}

usage() {
  cat <<EOF
Usage: tpu_scripts/supervise.sh [flags] -- ARGS...

Runs 'python -m ddk_jax.main ARGS...' on every worker of the TPU VM NAME until the job
ends, and exits with its status:

  * the TPU is created (create.sh) when it does not exist, and set up (setup.sh) once;
  * the job is run with launch.sh (logs in LOGS_DIR/attempt-K/worker-N.log);
  * exit 0: done.  Exit 2, 3 or 4 (bad config, non-finite steps, checkpoint I/O): the job
    itself failed; not retried, its status is returned;
  * exit 143 (SIGTERM: preemption notice, maintenance), an ssh failure (255), a worker
    that is not set up (69: set up again) or a TPU that is PREEMPTED / TERMINATED /
    SUSPENDED / FAILED / gone: a restart.  A TPU that is not
    READY is deleted and created again (teardown.sh, create.sh, setup.sh), then the same
    command runs again and resumes from the latest checkpoint in its workdir;
  * any other failure (a crash) on a READY TPU is returned, unless --retry-on-failure.
  At most --max-restarts restarts; then the last status is returned.

  --max-restarts N      [DDK_TPU_MAX_RESTARTS, else 5]
  --retry-seconds S     wait before a restart [DDK_TPU_RETRY_SECONDS, else 60]
  --retry-on-failure    also restart after other failures of the job (crashes)
  --skip-setup          do not run setup.sh on an existing TPU at start (it still runs after a recreate)
  --teardown            delete the TPU when the job has ended (done or failed)
  --logs-dir DIR        [DDK_TPU_LOGS_DIR, else runs/tpu_logs/NAME/<UTC time>]
create.sh flags (used when the TPU is created): --accelerator-type, --runtime-version, --spot, --wait-timeout
setup.sh flags: --extras, --python
launch.sh flags: --module, --grace, --workers

$COMMON_HELP

The workdir must be shared by all workers and survive the VM (gs://bucket/run).

Example (spot v4-32, recreated after preemptions):
  tpu_scripts/supervise.sh --name ddk-v4 --zone us-central2-b --accelerator-type v4-32 --spot \\
      -- --config=configs/tinyllama.py --workdir=gs://my-bucket/ddk_tinyllama \\
         --config.teacher.path=gs://my-bucket/Llama-2-13b-hf --config.student.path=gs://my-bucket/TinyLlama_v1.1

Exit status: the job's (see launch.sh --help and docs/tpu.md); 64 bad arguments; 69 the TPU
could not be created or set up (after the restarts); 130 interrupted.
EOF
}

COMMON_ARGS=()
CREATE_ARGS=()
SETUP_ARGS=()
LAUNCH_ARGS=()
ARGS=()
split_args "$@"
set -- ${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}
while [ $# -gt 0 ]; do
  common_flag "$@"
  if [ "$CONSUMED" -gt 0 ]; then shift "$CONSUMED"; continue; fi
  case "$1" in
    --max-restarts) need_value "$1" "${2-}" "$#"; MAX_RESTARTS=$2; shift 2 ;;
    --retry-seconds) need_value "$1" "${2-}" "$#"; RETRY_SECONDS=$2; shift 2 ;;
    --retry-on-failure) RETRY_ON_FAILURE=1; shift ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    --teardown) TEARDOWN_AT_END=1; shift ;;
    --logs-dir) need_value "$1" "${2-}" "$#"; LOGS_DIR=$2; shift 2 ;;
    --accelerator-type | --runtime-version) need_value "$1" "${2-}" "$#"; CREATE_ARGS+=("$1" "$2"); shift 2 ;;
    --wait-timeout) need_value "$1" "${2-}" "$#"; WAIT_TIMEOUT=$2; shift 2 ;;
    --spot) CREATE_ARGS+=("$1"); shift ;;
    --extras | --python) need_value "$1" "${2-}" "$#"; SETUP_ARGS+=("$1" "$2"); shift 2 ;;
    --module | --grace | --workers) need_value "$1" "${2-}" "$#"; LAUNCH_ARGS+=("$1" "$2"); shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "$EX_USAGE" "unknown argument '$1': the job's own arguments go after -- (see --help)" ;;
  esac
done
loc_flags
for v in MAX_RESTARTS RETRY_SECONDS WAIT_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$EX_USAGE" "$v='${!v}' is not a whole number (see --help)"
done
[ "${#ARGS[@]}" -gt 0 ] || die "$EX_USAGE" "no job arguments: put the ddk_jax.main flags after -- (see --help)"
COMMON_ARGS=(--name "$TPU_NAME")
if [ -n "$TPU_ZONE" ]; then COMMON_ARGS+=(--zone "$TPU_ZONE"); fi
if [ -n "$TPU_PROJECT" ]; then COMMON_ARGS+=(--project "$TPU_PROJECT"); fi
if [ "$TPU_QUEUED" = 1 ]; then COMMON_ARGS+=(--queued); fi
CREATE_ARGS+=(--wait-timeout "$WAIT_TIMEOUT")
LOGS_DIR=${LOGS_DIR:-$DDK_ROOT/runs/tpu_logs/$TPU_NAME/$(stamp)}
mkdir -p "$LOGS_DIR"

INTERRUPTED=0
CHILD=""
# Ctrl-C / SIGTERM: the running launch is told to stop (the job saves a checkpoint), then we exit 130.
on_signal() {
  INTERRUPTED=1
  if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null || true; fi
}
trap on_signal INT TERM

# Runs a command in the background and waits for it, so a signal here can be passed on.
run_child() {
  local rc=0
  "$@" &
  CHILD=$!
  while :; do
    if wait "$CHILD"; then rc=0; else rc=$?; fi
    kill -0 "$CHILD" 2>/dev/null || break
  done
  CHILD=""
  return "$rc"
}

finish() {
  if [ "$TEARDOWN_AT_END" = 1 ]; then
    "$TPU_SCRIPTS_DIR/teardown.sh" "${COMMON_ARGS[@]}" || say "teardown failed; delete $TPU_NAME by hand"
  fi
  echo "$1" >"$LOGS_DIR/exit_status"
  say "supervise: exit status $1 ($(describe_exit "$1")); logs in $LOGS_DIR"
  exit "$1"
}

NEED_SETUP=$((1 - SKIP_SETUP))
# Makes the TPU READY and set up: waits for it, or deletes and creates it again.
prepare_tpu() {
  local health
  health=$(tpu_health)
  if [ "$health" = BUSY ]; then
    wait_ready "$WAIT_TIMEOUT" || true
    health=$(tpu_health)
  fi
  case "$health" in
    READY) ;;
    PREEMPTED | BUSY)
      say "$TPU_NAME is $health: deleting it and creating it again"
      "$TPU_SCRIPTS_DIR/teardown.sh" "${COMMON_ARGS[@]}" || return "$EX_UNAVAILABLE"
      "$TPU_SCRIPTS_DIR/create.sh" "${COMMON_ARGS[@]}" "${CREATE_ARGS[@]}" || return "$EX_UNAVAILABLE"
      NEED_SETUP=1 ;;
    MISSING)
      say "$TPU_NAME does not exist: creating it"
      "$TPU_SCRIPTS_DIR/create.sh" "${COMMON_ARGS[@]}" "${CREATE_ARGS[@]}" || return "$EX_UNAVAILABLE"
      NEED_SETUP=1 ;;
    *) return "$EX_TEMPFAIL" ;;
  esac
  if [ "$NEED_SETUP" = 1 ]; then
    "$TPU_SCRIPTS_DIR/setup.sh" "${COMMON_ARGS[@]}" ${SETUP_ARGS[@]+"${SETUP_ARGS[@]}"} || return "$EX_UNAVAILABLE"
    NEED_SETUP=0
  fi
}

attempt=0
restarts=0
while :; do
  attempt=$((attempt + 1))
  rc=0
  prepare_tpu || rc=$?
  [ "$INTERRUPTED" = 1 ] && finish 130
  if [ "$rc" = 0 ]; then
    say "attempt $attempt: launching on $TPU_NAME"
    run_child "$TPU_SCRIPTS_DIR/launch.sh" "${COMMON_ARGS[@]}" ${LAUNCH_ARGS[@]+"${LAUNCH_ARGS[@]}"} \
      --logs-dir "$LOGS_DIR/attempt-$attempt" -- "${ARGS[@]}" || rc=$?
    [ "$INTERRUPTED" = 1 ] && finish 130
    case "$rc" in
      0 | 2 | 3 | 4 | 64 | 130) finish "$rc" ;;
    esac
    # A worker without the checkout or venv (e.g. a VM recreated outside this script): set up again.
    if [ "$rc" = "$EX_UNAVAILABLE" ]; then NEED_SETUP=1; fi
    health=$(tpu_health)
    if [ "$health" = READY ] && [ "$rc" != 143 ] && [ "$rc" != 255 ] && [ "$rc" != "$EX_TEMPFAIL" ] &&
      [ "$rc" != "$EX_UNAVAILABLE" ] && [ "$RETRY_ON_FAILURE" = 0 ]; then
      say "the job failed with status $rc on a READY TPU: $(describe_exit "$rc"); not restarting (--retry-on-failure would)"
      finish "$rc"
    fi
    say "attempt $attempt ended with status $rc ($(describe_exit "$rc")); $TPU_NAME is $health"
  else
    say "attempt $attempt: the TPU could not be made ready (status $rc)"
  fi
  restarts=$((restarts + 1))
  if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
    say "giving up after $MAX_RESTARTS restart(s)"
    finish "$rc"
  fi
  say "restart $restarts of $MAX_RESTARTS in ${RETRY_SECONDS}s"
  sleep "$RETRY_SECONDS"
  [ "$INTERRUPTED" = 1 ] && finish 130
done
