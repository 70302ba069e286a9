#!/usr/bin/env bash
# Runs on each TPU worker (launch.sh calls it before every launch and to stop a job): stops
# ddk_jax processes of this user left from an earlier run, then removes libtpu's lock file
# (/tmp/libtpu_lockfile) so the next run can open the TPU.
#   bash ddk_jax/tpu_scripts/worker_cleanup.sh [--grace SECONDS]
# Stopped are: the job in ~/.ddk_jax_run/train.pid, and any python -m ddk_jax.main /
# ddk_jax.export / ddk-train process running in ~/ddk_jax or holding a TPU device.  They get
# SIGTERM (a ddk_jax run saves its checkpoint), then SIGKILL after the grace period.
set -uo pipefail

grace=30
while [ $# -gt 0 ]; do
  case "$1" in
    --grace) grace=$2; shift 2 ;;
    *) echo "worker_cleanup.sh: unknown argument '$1'" >&2; exit 64 ;;
  esac
done
lockfile=${DDK_TPU_LOCKFILE:-/tmp/libtpu_lockfile}
poll=${DDK_TPU_POLL_SECONDS:-1}
dir=$(cd "$HOME/ddk_jax" 2>/dev/null && pwd -P) || dir=$HOME/ddk_jax
pidfile=$HOME/.ddk_jax_run/train.pid
host=$(hostname)

# True when process $1 runs from the checkout directory.
in_checkout() { [ "$(readlink "/proc/$1/cwd" 2>/dev/null)" = "$dir" ]; }

# True when process $1 has a TPU device open.
holds_tpu() {
  local fd target
  for fd in /proc/"$1"/fd/*; do
    target=$(readlink "$fd" 2>/dev/null) || continue
    case "$target" in /dev/accel* | /dev/vfio/[0-9]*) return 0 ;; esac
  done
  return 1
}

# True when process $1 is a ddk_jax command of this user (other than this script and its caller).
is_ddk_job() {
  local pid=$1 arg match=0
  [ "$pid" != "$$" ] && [ "$pid" != "$PPID" ] && [ -O "/proc/$pid" ] || return 1
  while IFS= read -r -d '' arg; do
    case "$arg" in ddk_jax.main | ddk_jax.export | ddk-train | */ddk-train) match=1; break ;; esac
  done <"/proc/$pid/cmdline" 2>/dev/null
  [ "$match" = 1 ] && { in_checkout "$pid" || holds_tpu "$pid"; }
}

# True while process $1 runs (a zombie waiting for its parent counts as ended).
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

targets=()
add_target() {
  local t
  for t in ${targets[@]+"${targets[@]}"}; do [ "$t" = "$1" ] && return 0; done
  targets+=("$1")
}
if [ -f "$pidfile" ]; then
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [[ $pid =~ ^[0-9]+$ ]] && [ -O "/proc/$pid" ] && in_checkout "$pid" && running "$pid"; then add_target "$pid"; fi
fi
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  if is_ddk_job "$pid" && running "$pid"; then add_target "$pid"; fi
done

signal() {  # signal PID: the whole group when PID leads one
  local sig=$1 pid=$2 pgid
  pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')
  if [ "$pgid" = "$pid" ]; then kill "-$sig" -- "-$pid" 2>/dev/null; else kill "-$sig" "$pid" 2>/dev/null; fi
}

stopped=0
if [ "${#targets[@]}" -gt 0 ]; then
  echo "[$host] stopping ddk_jax process(es) ${targets[*]} (SIGTERM, SIGKILL after ${grace}s)"
  for pid in "${targets[@]}"; do signal TERM "$pid"; done
  deadline=$(($(date +%s) + grace))
  while :; do
    alive=()
    for pid in "${targets[@]}"; do if running "$pid"; then alive+=("$pid"); fi; done
    [ "${#alive[@]}" -gt 0 ] || break
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "[$host] still running after ${grace}s, killing: ${alive[*]}"
      for pid in "${alive[@]}"; do signal KILL "$pid"; done
      break
    fi
    sleep "$poll"
  done
  stopped=${#targets[@]}
fi
rm -f "$pidfile"
removed=""
if [ -e "$lockfile" ]; then
  rm -f "$lockfile" && removed=", removed $lockfile"
fi
echo "[$host] cleanup: $stopped ddk_jax process(es) stopped$removed"
exit 0
