#!/usr/bin/env bash
# Runs one training command on every worker of a Cloud TPU VM slice (multi-host: JAX
# discovers the other workers from the TPU metadata; ddk_jax calls jax.distributed.initialize).
#   bash tpu_scripts/run_on_tpu_vm.sh TPU_NAME ZONE -- --config=configs/tinyllama.py --workdir=gs://bucket/run1 \
#        --config.teacher.path=gs://bucket/Llama-2-13b-hf --config.student.path=gs://bucket/TinyLlama_v1.1
# The workdir must be shared by all workers (gs:// or a common mount). A preempted run is
# resumed by running the same command again.
set -euo pipefail
TPU_NAME=${1:?usage: run_on_tpu_vm.sh TPU_NAME ZONE -- ARGS...}
ZONE=${2:?usage: run_on_tpu_vm.sh TPU_NAME ZONE -- ARGS...}
shift 2
[ "${1:-}" = "--" ] && shift
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" \
  --command="cd ~/ddk_jax && nohup .venv/bin/python -m ddk_jax.main $ARGS > ~/ddk_jax_train.log 2>&1 &"
echo "started on all workers; follow with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/ddk_jax_train.log'"
