#!/usr/bin/env bash
# Runs one ddk_jax command on every worker of the TPU VM, in the foreground, and exits with
# the job's status.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODULE=${DDK_TPU_MODULE:-ddk_jax.main}
LOGS_DIR=${DDK_TPU_LOGS_DIR:-}
GRACE=${DDK_TPU_STOP_GRACE:-60}
WORKERS=${DDK_TPU_WORKERS:-}

usage() {
  cat <<EOF
Usage: tpu_scripts/launch.sh [flags] -- ARGS...

Runs 'python -m MODULE ARGS...' on every worker of the TPU VM NAME at once and waits for
it.  Before starting, processes of an earlier ddk_jax run on the workers are stopped and
/tmp/libtpu_lockfile is removed.  Each worker's output is printed with a '[worker N]'
prefix and kept in LOGS_DIR/worker-N.log (the workers also keep ~/ddk_jax_logs/).  When a
worker fails, the job is stopped on all the others (SIGTERM, so they save a checkpoint,
then SIGKILL after the grace period).  Ctrl-C does the same.

  --module M          python module to run [DDK_TPU_MODULE, else ddk_jax.main; e.g. ddk_jax.export]
  --logs-dir DIR      local log directory [DDK_TPU_LOGS_DIR, else runs/tpu_logs/NAME/<UTC time>]
  --grace SECONDS     time the job gets to save a checkpoint when stopped [DDK_TPU_STOP_GRACE, else 60]
  --workers N         number of workers (default: from 'gcloud ... describe') [DDK_TPU_WORKERS]

$COMMON_HELP

The workdir must be one every worker reaches (gs://bucket/run); the same command run again
resumes from its latest checkpoint.

Example:
  tpu_scripts/launch.sh --name ddk-v4 --zone us-central2-b -- --config=configs/tinyllama.py \\
      --workdir=gs://my-bucket/ddk_tinyllama --config.teacher.path=gs://my-bucket/Llama-2-13b-hf

Exit status: the job's (0 done, 2 bad config, 3 non-finite, 4 checkpoint, 143 SIGTERM /
preempted, see docs/tpu.md); 255 an ssh session failed (VM gone or unreachable); 64 bad
arguments; 69 a worker is not set up; 75 the TPU is not READY; 130 interrupted.
EOF
}

ARGS=()
split_args "$@"
set -- ${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}
while [ $# -gt 0 ]; do
  common_flag "$@"
  if [ "$CONSUMED" -gt 0 ]; then shift "$CONSUMED"; continue; fi
  case "$1" in
    --module) need_value "$1" "${2-}" "$#"; MODULE=$2; shift 2 ;;
    --logs-dir) need_value "$1" "${2-}" "$#"; LOGS_DIR=$2; shift 2 ;;
    --grace) need_value "$1" "${2-}" "$#"; GRACE=$2; shift 2 ;;
    --workers) need_value "$1" "${2-}" "$#"; WORKERS=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "$EX_USAGE" "unknown argument '$1': the job's own arguments go after -- (see --help)" ;;
  esac
done
loc_flags
[[ $MODULE =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "$EX_USAGE" "--module '$MODULE' is not a python module name"
[[ $GRACE =~ ^[0-9]+$ ]] || die "$EX_USAGE" "--grace '$GRACE' is not a number of seconds"
[ -z "$WORKERS" ] || [[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "$EX_USAGE" "--workers '$WORKERS' is not a positive number"

health=$(tpu_health)
[ "$health" = READY ] || die "$EX_TEMPFAIL" "$TPU_NAME is $health, not READY"
if [ -z "$WORKERS" ]; then
  WORKERS=$(worker_count) || die "$EX_TEMPFAIL" "cannot read the workers of $TPU_NAME"
fi
LOGS_DIR=${LOGS_DIR:-$DDK_ROOT/runs/tpu_logs/$TPU_NAME/$(stamp)}
mkdir -p "$LOGS_DIR"
LOGS_DIR=$(cd "$LOGS_DIR" && pwd)
rm -f "$LOGS_DIR"/worker-*.status "$LOGS_DIR/exit_status"
quoted=""
if [ "${#ARGS[@]}" -gt 0 ]; then quoted=$(printf ' %q' "${ARGS[@]}"); fi
printf 'python -m %s%s\n' "$MODULE" "$quoted" >"$LOGS_DIR/command.txt"

cleanup_cmd="bash ddk_jax/tpu_scripts/worker_cleanup.sh --grace $GRACE"
say "cleaning up $WORKERS worker(s) of $TPU_NAME (earlier ddk_jax processes, /tmp/libtpu_lockfile)"
rc=0
tpu_ssh all "$cleanup_cmd" $((GRACE + 300)) || rc=$?
if [ "$rc" = 255 ]; then
  echo 255 >"$LOGS_DIR/exit_status"
  die 255 "ssh to $TPU_NAME failed during cleanup"
elif [ "$rc" != 0 ]; then
  echo "$EX_UNAVAILABLE" >"$LOGS_DIR/exit_status"
  die "$EX_UNAVAILABLE" "cleanup failed on $TPU_NAME (exit $rc): was tpu_scripts/setup.sh run?"
fi

# One background job per worker: ssh's output goes to the worker's log file and, prefixed,
# to stdout; its exit status goes to worker-N.status.  Job control gives each its own
# process group, so it can be ended as a whole.
run_worker() {
  local i=$1 rc
  set +e
  # stdin from /dev/null: a background job reading the terminal would be stopped.
  tpu_ssh "$i" "bash ddk_jax/tpu_scripts/worker_run.sh --module $MODULE --$quoted" </dev/null 2>&1 |
    awk -v p="[worker $i] " -v f="$LOGS_DIR/worker-$i.log" '{ print > f; fflush(f); print p $0; fflush() }'
  rc=${PIPESTATUS[0]}
  echo "$rc" >"$LOGS_DIR/worker-$i.status.tmp"
  mv "$LOGS_DIR/worker-$i.status.tmp" "$LOGS_DIR/worker-$i.status"
}

PIDS=()
# Ends the job on every worker, then the local ssh sessions.
stop_workers() {
  say "stopping the job on every worker of $TPU_NAME (SIGTERM, SIGKILL after ${GRACE}s)"
  tpu_ssh all "$cleanup_cmd" $((GRACE + 120)) 2>&1 | sed 's/^/  /' >&2 || true
  local deadline=$(($(date +%s) + 30)) pid
  while [ "$(date +%s)" -lt "$deadline" ]; do
    [ "$(finished)" -ge "$WORKERS" ] && break
    sleep "$POLL_SECONDS"
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

finished() {
  local n=0 i
  for ((i = 0; i < WORKERS; i++)); do [ -f "$LOGS_DIR/worker-$i.status" ] && n=$((n + 1)); done
  echo "$n"
}

# shellcheck disable=SC2329  # called from a trap
on_signal() {
  trap '' INT TERM
  say "interrupted"
  stop_workers
  echo "$1" >"$LOGS_DIR/exit_status"
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

say "starting python -m $MODULE on $WORKERS worker(s) of $TPU_NAME; logs in $LOGS_DIR"
set -m
for ((i = 0; i < WORKERS; i++)); do
  run_worker "$i" &
  PIDS+=("$!")
done
set +m

failed=""
while :; do
  for ((i = 0; i < WORKERS; i++)); do
    f=$LOGS_DIR/worker-$i.status
    if [ -f "$f" ] && [ "$(cat "$f")" != 0 ]; then failed=$i; break; fi
  done
  [ -n "$failed" ] && break
  [ "$(finished)" -ge "$WORKERS" ] && break
  sleep "$POLL_SECONDS"
done

if [ -n "$failed" ]; then
  rc=$(cat "$LOGS_DIR/worker-$failed.status")
  say "worker $failed exited with status $rc: $(describe_exit "$rc")"
  stop_workers
else
  rc=0
  wait 2>/dev/null || true
fi
echo "$rc" >"$LOGS_DIR/exit_status"
say "job exit status $rc ($(describe_exit "$rc")); logs in $LOGS_DIR"
exit "$rc"
