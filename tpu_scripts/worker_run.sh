#!/usr/bin/env bash
# Runs on each TPU worker (started by launch.sh over ssh): runs one ddk_jax command in the
# foreground from ~/ddk_jax and exits with its status.  Output goes to ssh (launch.sh keeps
# it locally) and to ~/ddk_jax_logs/<time>.log on the worker.  The process id is kept in
# ~/.ddk_jax_run/train.pid so worker_cleanup.sh can stop it; SIGTERM/SIGHUP/SIGINT here are
# passed on to the job as SIGTERM (it saves a checkpoint and exits 143).
#   bash ddk_jax/tpu_scripts/worker_run.sh [--module ddk_jax.main] -- ARGS...
set -uo pipefail

module=ddk_jax.main
while [ $# -gt 0 ]; do
  case "$1" in
    --module) module=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "worker_run.sh: unknown argument '$1'" >&2; exit 64 ;;
  esac
done

dir=$HOME/ddk_jax
state=$HOME/.ddk_jax_run
logs=$HOME/ddk_jax_logs
py=$dir/.venv/bin/python
if [ ! -x "$py" ]; then
  echo "[$(hostname)] $py is missing: run tpu_scripts/setup.sh first" >&2
  exit 69
fi
mkdir -p "$state" "$logs"
log=$logs/$(date -u +%Y%m%d-%H%M%S).log
cd "$dir" || exit 69
export PYTHONUNBUFFERED=1

# tee -p: the worker's copy goes on being written after ssh has gone away.
exec {out}> >(tee -p -a "$log")
tee_pid=$!
# setsid: the job leads its own process group, so stopping it stops everything it started.
setsid "$py" -m "$module" "$@" >&"$out" 2>&1 &
pid=$!
echo "$pid" >"$state/train.pid"

# shellcheck disable=SC2329  # called from a trap
stop() { kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; }
trap stop TERM HUP INT

rc=0
while :; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" 2>/dev/null || break  # still running: a trapped signal ended the wait
done
exec {out}>&-
wait "$tee_pid" 2>/dev/null || true
if [ "$(cat "$state/train.pid" 2>/dev/null)" = "$pid" ]; then rm -f "$state/train.pid"; fi
exit "$rc"
