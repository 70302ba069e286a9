#!/usr/bin/env bash
# Deletes the TPU VM (or the queued resource and its node) and waits until it is gone.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WAIT_TIMEOUT=${DDK_TPU_WAIT_TIMEOUT:-1800}

usage() {
  cat <<EOF
Usage: tpu_scripts/teardown.sh [flags]

Deletes the TPU VM NAME (with --queued: the queued resource NAME and its node) and waits
until it is gone.  Nothing on the VM's disks survives; checkpoints in a gs:// workdir do.

  --wait-timeout SECONDS   stop waiting for the deletion after this long, 0 = never [DDK_TPU_WAIT_TIMEOUT, else 1800]

$COMMON_HELP

Exit status: 0 deleted (or there was nothing to delete), 64 bad arguments, 69 deletion failed.
EOF
}

split_args "$@"
set -- ${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}
while [ $# -gt 0 ]; do
  common_flag "$@"
  if [ "$CONSUMED" -gt 0 ]; then shift "$CONSUMED"; continue; fi
  case "$1" in
    --wait-timeout) need_value "$1" "${2-}" "$#"; WAIT_TIMEOUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "$EX_USAGE" "unknown argument '$1' (see --help)" ;;
  esac
done
loc_flags
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "$EX_USAGE" "--wait-timeout '$WAIT_TIMEOUT' is not a number of seconds"

health=$(tpu_health)
if [ "$health" = MISSING ]; then
  say "$TPU_NAME does not exist; nothing to delete"
  exit 0
fi
say "deleting $TPU_NAME (was $health)"
if [ "$TPU_QUEUED" = 1 ]; then
  queued_resource delete --force --quiet || die "$EX_UNAVAILABLE" "deleting the queued resource $TPU_NAME failed (gcloud's message above)"
else
  tpu_vm delete --quiet || die "$EX_UNAVAILABLE" "deleting $TPU_NAME failed (gcloud's message above)"
fi
start=$(date +%s)
while [ "$(tpu_health)" != MISSING ]; do
  if [ "$WAIT_TIMEOUT" != 0 ] && [ $(($(date +%s) - start)) -ge "$WAIT_TIMEOUT" ]; then
    die "$EX_UNAVAILABLE" "$TPU_NAME still exists ${WAIT_TIMEOUT}s after the delete"
  fi
  say "waiting for $TPU_NAME to be deleted"
  sleep "$WAIT_POLL_SECONDS"
done
say "$TPU_NAME deleted"
