#!/usr/bin/env bash
# Installs ddk_jax with the TPU build of JAX on every worker of a Cloud TPU VM slice.
#   bash tpu_scripts/setup_tpu_vm.sh TPU_NAME ZONE [PROJECT]
# Copies this checkout to ~/ddk_jax on each worker and installs it into ~/ddk_jax/.venv.
set -euo pipefail
TPU_NAME=${1:?usage: setup_tpu_vm.sh TPU_NAME ZONE [PROJECT]}
ZONE=${2:?usage: setup_tpu_vm.sh TPU_NAME ZONE [PROJECT]}
PROJECT_FLAG=${3:+--project=$3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

tar -C "$ROOT" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/ddk_jax_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/ddk_jax_src.tgz "$TPU_NAME":/tmp/ --worker=all --zone="$ZONE" $PROJECT_FLAG
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" $PROJECT_FLAG --command='
  set -e
  mkdir -p ~/ddk_jax && tar -C ~/ddk_jax -xzf /tmp/ddk_jax_src.tgz
  cd ~/ddk_jax && python3 -m venv .venv && .venv/bin/pip install -q -e ".[tpu]"
  .venv/bin/python -c "import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)"
'
