# Sourced by the launch/*.sh scripts (not run on its own): settings, flag parsing, --dry-run.
#
# Settings come from the environment or from flags (a flag wins):
#   PROJECT          --project   Google Cloud project
#   ZONE             --zone      zone of the slice, e.g. us-central2-b (v4), us-west4-a (v5e)
#   TPU_NAME         --name      name of the TPU VM slice
#   ACCELERATOR_TYPE --type      e.g. v4-32, v5litepod-64
#   RUNTIME_VERSION  --version   TPU VM image (default: from the accelerator type)
#   BUCKET           --bucket    GCS bucket, without gs:// (layout: docs/tpu.md)
#   QUEUED_RESOURCE  --queued-resource   queued-resource id (default: TPU_NAME-qr)
#   DRY_RUN=1        --dry-run   print the commands (a shell script) instead of running them

PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
BUCKET=${BUCKET:-}
QUEUED_RESOURCE=${QUEUED_RESOURCE:-}
DRY_RUN=${DRY_RUN:-0}
REMOTE_DIR='~/paft_jax'   # where install.sh unpacks the repo on each worker (expanded there)

die() { echo "error: $*" >&2; exit 2; }

usage() {  # the comment block at the top of the calling script
  sed -n '2,/^[^#]/p' "$0" | sed -e '/^[^#]/d' -e 's/^# \{0,1\}//'
}

# parse_flag "$@": handle one flag common to all scripts; sets SHIFT to the number of words used.
parse_flag() {
  local flag=$1 value=${2-} n=2
  if [[ $flag == --*=* ]]; then value=${flag#*=}; flag=${flag%%=*}; n=1; fi
  case $flag in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; SHIFT=1; return ;;
    --project|--zone|--name|--type|--version|--bucket|--queued-resource)
      [[ $n == 1 || $# -ge 2 ]] || die "$flag needs a value" ;;
    *) die "unknown argument '$1' (see $0 --help)" ;;
  esac
  case $flag in
    --project) PROJECT=$value ;;
    --zone) ZONE=$value ;;
    --name) TPU_NAME=$value ;;
    --type) ACCELERATOR_TYPE=$value ;;
    --version) RUNTIME_VERSION=$value ;;
    --bucket) BUCKET=$value ;;
    --queued-resource) QUEUED_RESOURCE=$value ;;
  esac
  SHIFT=$n
}

# need VAR...: refuse to go on without these settings.
need() {
  local v
  for v in "$@"; do
    [[ -n ${!v:-} ]] || die "$v is not set (environment variable, or its flag; see $0 --help)"
  done
  BUCKET=${BUCKET#gs://}; BUCKET=${BUCKET%/}
  QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME-qr}
}

# The TPU VM image for an accelerator type (Cloud TPU docs, "TPU software versions").
default_runtime() {
  case $1 in
    v4-*|v3-*|v2-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default RUNTIME_VERSION for accelerator type '$1': set it" ;;
  esac
}

# quote WORD...: the words as one shell line, single-quoting those that need it (--flag='value').
quote() {
  local w pre out=""
  for w in "$@"; do
    pre=""
    if [[ $w =~ ^--[A-Za-z-]+= ]]; then pre=${w%%=*}=; w=${w#*=}; fi
    if [[ ! $w =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then w="'${w//\'/\'\\\'\'}'"; fi
    out+=" $pre$w"
  done
  echo "${out# }"
}

# run CMD...: run it, or under --dry-run print it (the printed lines form a runnable script).
run() {
  if [[ $DRY_RUN == 1 ]]; then quote "$@"; else "$@"; fi
}

# note TEXT: a comment on stderr (in dry-run, a comment line in the printed script).
note() {
  if [[ $DRY_RUN == 1 ]]; then echo "# $*"; else echo "[launch] $*" >&2; fi
}

# tpu_ssh COMMAND [gcloud flags...]: run a shell command on every worker of the slice, at the same time.
tpu_ssh() {
  local cmd=$1; shift
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all \
    --command="$cmd" "$@"
}
