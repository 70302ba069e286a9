#!/usr/bin/env bash
# Runs on each TPU worker (started by setup.sh over ssh): makes ~/ddk_jax/.venv with
# Python >= 3.11, installs ddk_jax into it and prints the worker's JAX devices.
#   bash ddk_jax/tpu_scripts/worker_setup.sh [--extras tpu] [--python /usr/bin/python3.11]
set -euo pipefail

extras=tpu
python=${DDK_TPU_PYTHON:-}
uv_python=${DDK_TPU_UV_PYTHON:-3.11}  # the version uv installs when the worker has none >= 3.11
while [ $# -gt 0 ]; do
  case "$1" in
    --extras) extras=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    *) echo "worker_setup.sh: unknown argument '$1'" >&2; exit 64 ;;
  esac
done

dir=$HOME/ddk_jax
venv=$dir/.venv
host=$(hostname)
say() { echo "[$host] $*"; }
fail() {
  say "error: $*" >&2
  exit 69
}

version_of() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null; }

# True when interpreter $1 runs and is Python >= 3.11.
new_enough() {
  local v major minor
  v=$(version_of "$1") || return 1
  major=${v%%.*}
  minor=${v#*.}
  minor=${minor%%.*}
  [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || return 1
  [ "$major" -gt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -ge 11 ]; }
}

[ -f "$dir/pyproject.toml" ] || fail "no ddk_jax checkout in $dir (tpu_scripts/setup.sh copies it)"

if [ -x "$venv/bin/python" ] && new_enough "$venv/bin/python"; then
  say "reusing $venv (Python $(version_of "$venv/bin/python"))"
else
  rm -rf "$venv"
  found=""
  if [ -n "$python" ]; then
    candidates=("$python")
  else
    candidates=(python3.13 python3.12 python3.11 python3)
  fi
  for c in "${candidates[@]}"; do
    path=$(command -v "$c" 2>/dev/null) || continue
    if new_enough "$path"; then found=$path; break; fi
  done
  if [ -n "$found" ] && "$found" -m venv "$venv" >/dev/null 2>&1; then
    say "created $venv with $found (Python $(version_of "$found"))"
  else
    rm -rf "$venv"
    if [ -n "$found" ]; then
      say "$found cannot make a venv (no ensurepip); installing Python $uv_python with uv"
    else
      say "no Python >= 3.11 here (${candidates[*]}); installing Python $uv_python with uv"
    fi
    uv=$(command -v uv 2>/dev/null || echo "$HOME/.local/bin/uv")
    if [ ! -x "$uv" ]; then
      base=${python:-$(command -v python3 2>/dev/null || true)}
      [ -n "$base" ] || fail "no python3 to install uv with: install pip (sudo apt-get install -y python3-pip) or uv, then rerun setup"
      "$base" -m pip install --user --quiet uv ||
        fail "'$base -m pip install --user uv' failed: install pip (sudo apt-get install -y python3-pip) or uv, then rerun setup"
    fi
    "$uv" python install "$uv_python" || fail "uv could not install Python $uv_python"
    "$uv" venv --python "$uv_python" --seed "$venv" || fail "uv could not create $venv"
    say "created $venv with uv (Python $(version_of "$venv/bin/python"))"
  fi
fi
new_enough "$venv/bin/python" || fail "$venv/bin/python is not Python >= 3.11"

cd "$dir"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]" ||
  fail "pip install -e '.[$extras]' failed (pip's message above)"
say "installed ddk_jax[$extras]"

# Every worker runs this at the same time (a multi-host slice only starts when all do).
export DDK_DISTRIBUTED_TIMEOUT=${DDK_DISTRIBUTED_TIMEOUT:-300}
"$venv/bin/python" -c '
import platform, sys
from ddk_jax import multihost
multihost.initialize()
import jax
d = jax.devices()
print(f"[{sys.argv[1]}] process {jax.process_index()} of {jax.process_count()}: Python {platform.python_version()}, "
      f"jax {jax.__version__}, {jax.local_device_count()} local / {jax.device_count()} global {d[0].platform} devices "
      f"({d[0].device_kind})", flush=True)
' "$host" || fail "JAX could not start on this worker (message above)"
