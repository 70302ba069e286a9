#!/usr/bin/env bash
# Copies this checkout to ~/ddk_jax on every worker of the TPU VM and installs it there.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

EXTRAS=${DDK_TPU_EXTRAS:-tpu}
PYTHON=${DDK_TPU_PYTHON:-}
SETUP_TIMEOUT=${DDK_TPU_SETUP_TIMEOUT:-1800}

usage() {
  cat <<EOF
Usage: tpu_scripts/setup.sh [flags]

On every worker of the TPU VM NAME: replaces ~/ddk_jax with this checkout (its .venv and
runs/ are kept), makes ~/ddk_jax/.venv with Python >= 3.11 (the newest python3.x >= 3.11
on the worker, else one installed with uv), runs pip install -e '.[EXTRAS]' and prints
each worker's JAX device count.  Safe to run again (e.g. after changing the code).

  --extras LIST     pip extras to install [DDK_TPU_EXTRAS, else tpu]
  --python PATH     interpreter on the workers to build the venv from [DDK_TPU_PYTHON]
  --timeout SECONDS give up on the workers' install after this long [DDK_TPU_SETUP_TIMEOUT, else 1800]

$COMMON_HELP

Exit status: 0 installed on all workers, 64 bad arguments, 69 copy or install failed
(the workers' messages are above), 75 the TPU is not READY.
EOF
}

split_args "$@"
set -- ${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}
while [ $# -gt 0 ]; do
  common_flag "$@"
  if [ "$CONSUMED" -gt 0 ]; then shift "$CONSUMED"; continue; fi
  case "$1" in
    --extras) need_value "$1" "${2-}" "$#"; EXTRAS=$2; shift 2 ;;
    --python) need_value "$1" "${2-}" "$#"; PYTHON=$2; shift 2 ;;
    --timeout) need_value "$1" "${2-}" "$#"; SETUP_TIMEOUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "$EX_USAGE" "unknown argument '$1' (see --help)" ;;
  esac
done
loc_flags
[[ $EXTRAS =~ ^[A-Za-z0-9_,-]+$ ]] || die "$EX_USAGE" "--extras '$EXTRAS': a comma-separated list such as tpu or tpu,test"
[[ $SETUP_TIMEOUT =~ ^[0-9]+$ ]] || die "$EX_USAGE" "--timeout '$SETUP_TIMEOUT' is not a number of seconds"

health=$(tpu_health)
[ "$health" = READY ] || die "$EX_TEMPFAIL" "$TPU_NAME is $health, not READY (create it with tpu_scripts/create.sh)"

tarball=$(mktemp "${TMPDIR:-/tmp}/ddk_jax_src.XXXXXX")
trap 'rm -f "$tarball"' EXIT
# The files git knows (tracked, or untracked and not ignored), so .venv, runs/ and caches
# stay behind; a plain directory (no git) is copied without those.
if git -C "$DDK_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$DDK_ROOT" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [ -e "$DDK_ROOT/$f" ]; then printf '%s\0' "$f"; fi; done |
    tar -C "$DDK_ROOT" --null -T - -czf "$tarball"
else
  tar -C "$DDK_ROOT" --exclude=./.venv --exclude=./runs --exclude=./.git --exclude='*.egg-info' \
    --exclude=__pycache__ -czf "$tarball" .
fi
say "copying $(du -h "$tarball" | cut -f1) of sources to every worker of $TPU_NAME"
tpu_scp_all "$tarball" ddk_jax_src.tgz ||
  die "$EX_UNAVAILABLE" "copying the sources to $TPU_NAME failed (gcloud's message above)"

python_flag=""
if [ -n "$PYTHON" ]; then python_flag="--python $(printf '%q' "$PYTHON")"; fi
# Runs on each worker, in its home directory.
remote="set -e
mkdir -p ddk_jax
find ddk_jax -mindepth 1 -maxdepth 1 ! -name .venv ! -name runs -exec rm -rf {} +
tar -C ddk_jax -xzf ddk_jax_src.tgz
rm -f ddk_jax_src.tgz
bash ddk_jax/tpu_scripts/worker_setup.sh --extras $EXTRAS $python_flag"
say "installing on every worker (Python check, pip install -e '.[$EXTRAS]', device count)"
tpu_ssh all "$remote" "$SETUP_TIMEOUT" ||
  die "$EX_UNAVAILABLE" "setup failed on at least one worker of $TPU_NAME (messages above)"
say "setup done on every worker of $TPU_NAME"
