# shellcheck shell=bash disable=SC2034  # the variables set here are used by the scripts that source it
# Shared by the tpu_scripts commands (sourced, not run): flags every command takes, gcloud
# wrappers, the TPU's state, exit codes.  See docs/tpu.md.

if [ -z "${BASH_VERSINFO[0]:-}" ] || [ "${BASH_VERSINFO[0]}" -lt 4 ]; then
  echo "tpu_scripts need bash >= 4 (on macOS: brew install bash)" >&2
  exit 64
fi

TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DDK_ROOT=$(cd "$TPU_SCRIPTS_DIR/.." && pwd)
export TPU_SCRIPTS_DIR DDK_ROOT

# Exit codes of the scripts themselves (a launched job's own status is passed on as it is).
EX_USAGE=64        # bad arguments to a script
EX_UNAVAILABLE=69  # the TPU could not be created, set up or deleted
EX_TEMPFAIL=75     # the TPU is not READY (being created or repaired, preempted, missing)

# Flags every command takes; each has an environment default.
TPU_NAME=${DDK_TPU_NAME:-ddk-jax}
TPU_ZONE=${DDK_TPU_ZONE:-}
TPU_PROJECT=${DDK_TPU_PROJECT:-}
TPU_QUEUED=${DDK_TPU_QUEUED:-0}
# Seconds between checks of running workers, and between state polls of a TPU being created/deleted.
POLL_SECONDS=${DDK_TPU_POLL_SECONDS:-5}
WAIT_POLL_SECONDS=${DDK_TPU_WAIT_POLL_SECONDS:-30}

COMMON_HELP="Flags every command takes (environment default in brackets):
  --name NAME          TPU VM (and queued resource) name [DDK_TPU_NAME, else ddk-jax]
  --zone ZONE          e.g. us-central2-b [DDK_TPU_ZONE, else gcloud's compute/zone]
  --project PROJECT    [DDK_TPU_PROJECT, else gcloud's core/project]
  --queued             the TPU is a queued resource named NAME (node NAME) [DDK_TPU_QUEUED=1]
  -h, --help           this help"

say() { printf '[tpu %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

die() {
  local code=$1
  shift
  say "error: $*"
  exit "$code"
}

# Rewrites --flag=value into --flag value (up to a bare --) into the array SPLIT_ARGS.
split_args() {
  SPLIT_ARGS=()
  local a rest=0
  for a in "$@"; do
    if [ "$rest" = 0 ] && [[ $a == --*=* ]]; then
      SPLIT_ARGS+=("${a%%=*}" "${a#*=}")
    else
      [ "$a" = "--" ] && rest=1
      SPLIT_ARGS+=("$a")
    fi
  done
}

# Dies unless flag $1 has a value ($2, present when $3 >= 2).
need_value() {
  [ "$3" -ge 2 ] || die "$EX_USAGE" "$1 needs a value (see --help)"
}

# Parses one flag every command takes: sets CONSUMED to the words used (0: not one of them).
common_flag() {
  CONSUMED=0
  case "$1" in
    --name) need_value "$1" "${2-}" "$#"; TPU_NAME=$2; CONSUMED=2 ;;
    --zone) need_value "$1" "${2-}" "$#"; TPU_ZONE=$2; CONSUMED=2 ;;
    --project) need_value "$1" "${2-}" "$#"; TPU_PROJECT=$2; CONSUMED=2 ;;
    --queued) TPU_QUEUED=1; CONSUMED=1 ;;
  esac
  return 0
}

# --zone/--project for gcloud, when given (else gcloud's configured defaults apply).
loc_flags() {
  LOC=()
  if [ -n "$TPU_ZONE" ]; then LOC+=("--zone=$TPU_ZONE"); fi
  if [ -n "$TPU_PROJECT" ]; then LOC+=("--project=$TPU_PROJECT"); fi
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "$EX_USAGE" "--name '$TPU_NAME': use lower-case letters, digits and '-', starting with a letter"
}

# gcloud compute tpus tpu-vm VERB NAME --zone --project ARGS...
tpu_vm() {
  local verb=$1
  shift
  gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" ${LOC[@]+"${LOC[@]}"} "$@"
}

# gcloud compute tpus queued-resources VERB NAME --zone --project ARGS...
queued_resource() {
  local verb=$1
  shift
  gcloud compute tpus queued-resources "$verb" "$TPU_NAME" ${LOC[@]+"${LOC[@]}"} "$@"
}

# Extra flags for every ssh/scp, e.g. DDK_TPU_SSH_ARGS="--internal-ip" or "--tunnel-through-iap".
ssh_extra_args() {
  SSH_EXTRA=()
  if [ -n "${DDK_TPU_SSH_ARGS:-}" ]; then read -r -a SSH_EXTRA <<<"$DDK_TPU_SSH_ARGS"; fi
}

# Runs COMMAND on worker W (a number or "all") over ssh, for at most LIMIT seconds (0: no
# limit).  Keep-alives make a vanished (preempted) VM an ssh failure (exit 255) within
# about two minutes.
tpu_ssh() {
  local worker=$1 command=$2 limit=${3:-0}
  ssh_extra_args
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" ${LOC[@]+"${LOC[@]}"} --worker="$worker"
    --command="$command" --ssh-flag=-oServerAliveInterval=30 --ssh-flag=-oServerAliveCountMax=4
    ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"})
  if [ "$limit" != 0 ] && command -v timeout >/dev/null 2>&1; then
    timeout "$limit" "${cmd[@]}"
  else
    "${cmd[@]}"
  fi
}

# Copies local file SRC to REMOTE (relative to the home directory) on every worker.
tpu_scp_all() {
  ssh_extra_args
  gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" ${LOC[@]+"${LOC[@]}"} --worker=all \
    ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"}
}

# Prints the TPU's health, one word:
#   READY      the VM can run a job
#   BUSY       being created, provisioned, repaired or restarted: wait
#   PREEMPTED  preempted, terminated, stopped, suspended or failed: delete and create again
#   MISSING    no such TPU (or queued resource)
#   UNKNOWN    gcloud failed for another reason (network, permissions): the message is on stderr
tpu_health() {
  local out err rc
  err=$(mktemp)
  if [ "$TPU_QUEUED" = 1 ]; then
    rc=0
    out=$(queued_resource describe --format='value(state.state)' 2>"$err") || rc=$?
    if [ "$rc" != 0 ]; then
      _missing_or_unknown "$err"
      return 0
    fi
    case "$out" in
      ACTIVE) ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING) rm -f "$err"; echo PREEMPTED; return 0 ;;
      *) rm -f "$err"; echo BUSY; return 0 ;;
    esac
  fi
  rc=0
  out=$(tpu_vm describe --format='value(state)' 2>"$err") || rc=$?
  if [ "$rc" != 0 ]; then
    _missing_or_unknown "$err"
    return 0
  fi
  rm -f "$err"
  case "$out" in
    READY) echo READY ;;
    PREEMPTED | TERMINATED | STOPPED | STOPPING | DELETING) echo PREEMPTED ;;
    *) echo BUSY ;;
  esac
}

_missing_or_unknown() {
  if grep -qiE 'NOT_FOUND|not found|does not exist' "$1"; then
    echo MISSING
  else
    sed 's/^/  gcloud: /' "$1" >&2
    echo UNKNOWN
  fi
  rm -f "$1"
}

# Polls until the TPU is READY.  Returns 1 when it is (or becomes) PREEMPTED or MISSING, or
# after $1 seconds (0: no limit).
wait_ready() {
  local limit=$1 start health
  start=$(date +%s)
  while :; do
    health=$(tpu_health)
    case "$health" in
      READY) return 0 ;;
      PREEMPTED | MISSING) say "$TPU_NAME is $health"; return 1 ;;
    esac
    if [ "$limit" != 0 ] && [ $(($(date +%s) - start)) -ge "$limit" ]; then
      say "$TPU_NAME is still $health after ${limit}s"
      return 1
    fi
    say "$TPU_NAME is $health; checking again in ${WAIT_POLL_SECONDS}s"
    sleep "$WAIT_POLL_SECONDS"
  done
}

# Number of workers (hosts) of the TPU VM, from its network endpoints.
worker_count() {
  local endpoints n
  endpoints=$(tpu_vm describe --format='value(networkEndpoints[].ipAddress)') || return 1
  n=$(printf '%s\n' "$endpoints" | awk -F'[;, \t]+' '{ for (i = 1; i <= NF; i++) if ($i != "") n++ } END { print n + 0 }')
  [ "$n" -ge 1 ] || return 1
  echo "$n"
}

# What an exit status of ddk_jax.main (or of these scripts) means.
describe_exit() {
  case "$1" in
    0) echo "done" ;;
    2) echo "bad command line, config or input (not retried; the log names the key and the fix)" ;;
    3) echo "stopped after repeated non-finite steps (not retried; see docs/reliability.md)" ;;
    4) echo "a checkpoint could not be written or read (not retried; see docs/reliability.md)" ;;
    64) echo "bad arguments to a tpu_scripts command" ;;
    69) echo "the TPU could not be created, set up or deleted" ;;
    75) echo "the TPU is not READY" ;;
    130) echo "interrupted" ;;
    137) echo "killed (SIGKILL, e.g. out of host memory)" ;;
    143) echo "stopped by SIGTERM (preemption or maintenance): the checkpoint of the current step was saved" ;;
    255) echo "ssh to a worker failed (VM preempted or unreachable)" ;;
    *) echo "failed" ;;
  esac
}

# Default runtime (software) version for an accelerator type.
default_runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# UTC time stamp for log directories.
stamp() { date -u +%Y%m%d-%H%M%S; }
