#!/usr/bin/env bash
# Creates a Cloud TPU VM, or a queued resource for one, and waits until it is READY.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE=${DDK_TPU_TYPE:-v4-8}
RUNTIME_VERSION=${DDK_TPU_RUNTIME:-}
SPOT=${DDK_TPU_SPOT:-0}
WAIT_TIMEOUT=${DDK_TPU_WAIT_TIMEOUT:-0}

usage() {
  cat <<EOF
Usage: tpu_scripts/create.sh [flags] [-- extra gcloud create flags]

Creates the TPU VM NAME (or, with --queued, the queued resource NAME for node NAME) and
waits until it is READY.  Does nothing when it is already READY.

  --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8 [DDK_TPU_TYPE, else v4-8]
  --runtime-version V       TPU software version [DDK_TPU_RUNTIME, else from the type:
                            v2/v3/v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
  --spot                    Spot capacity: cheaper, can be preempted at any time [DDK_TPU_SPOT=1]
  --wait-timeout SECONDS    give up waiting for READY after this long, 0 = never [DDK_TPU_WAIT_TIMEOUT, else 0]

$COMMON_HELP

Anything after -- goes to 'gcloud compute tpus tpu-vm create' (or 'queued-resources
create'), e.g. -- --network=my-net --service-account=me@proj.iam.gserviceaccount.com

Examples:
  tpu_scripts/create.sh --name ddk-v4 --zone us-central2-b --accelerator-type v4-32 --spot
  tpu_scripts/create.sh --name ddk-v5e --zone us-west4-a --accelerator-type v5litepod-16 --queued --spot

Exit status: 0 READY, 64 bad arguments, 69 creation failed or the TPU did not become READY.
EOF
}

EXTRA=()
split_args "$@"
set -- ${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}
while [ $# -gt 0 ]; do
  common_flag "$@"
  if [ "$CONSUMED" -gt 0 ]; then shift "$CONSUMED"; continue; fi
  case "$1" in
    --accelerator-type) need_value "$1" "${2-}" "$#"; ACCELERATOR_TYPE=$2; shift 2 ;;
    --runtime-version) need_value "$1" "${2-}" "$#"; RUNTIME_VERSION=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --wait-timeout) need_value "$1" "${2-}" "$#"; WAIT_TIMEOUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "$EX_USAGE" "unknown argument '$1' (see --help)" ;;
  esac
done
loc_flags
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "$EX_USAGE" "--wait-timeout '$WAIT_TIMEOUT' is not a number of seconds"
if [ -z "$RUNTIME_VERSION" ]; then
  RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
    die "$EX_USAGE" "no default runtime version for '$ACCELERATOR_TYPE': pass --runtime-version (see 'gcloud compute tpus versions list')"
fi

health=$(tpu_health)
case "$health" in
  READY) say "$TPU_NAME already exists and is READY"; exit 0 ;;
  BUSY) say "$TPU_NAME already exists and is being created; waiting"
    wait_ready "$WAIT_TIMEOUT" || die "$EX_UNAVAILABLE" "$TPU_NAME did not become READY"
    exit 0 ;;
  PREEMPTED) die "$EX_UNAVAILABLE" "$TPU_NAME exists but is preempted/stopped: delete it first (tpu_scripts/teardown.sh), or let tpu_scripts/supervise.sh recreate it" ;;
  UNKNOWN) die "$EX_UNAVAILABLE" "cannot read the state of $TPU_NAME (gcloud's message above)" ;;
esac

capacity=()
kind="on-demand"
if [ "$SPOT" = 1 ]; then capacity=(--spot); kind="spot"; fi
what="TPU VM"
if [ "$TPU_QUEUED" = 1 ]; then what="queued resource"; fi
say "creating $kind $ACCELERATOR_TYPE $what $TPU_NAME (runtime $RUNTIME_VERSION)"
if [ "$TPU_QUEUED" = 1 ]; then
  queued_resource create --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} ||
    die "$EX_UNAVAILABLE" "creating the queued resource $TPU_NAME failed (gcloud's message above)"
else
  tpu_vm create --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${capacity[@]+"${capacity[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} ||
    die "$EX_UNAVAILABLE" "creating $TPU_NAME failed (gcloud's message above; for spot capacity try again later or another zone)"
fi
wait_ready "$WAIT_TIMEOUT" || die "$EX_UNAVAILABLE" "$TPU_NAME did not become READY"
workers=$(worker_count) || workers="?"
say "$TPU_NAME is READY with $workers worker(s)"
