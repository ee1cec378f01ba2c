#!/usr/bin/env bash
# Run a paft_jax command on every worker of a Cloud TPU VM slice (multi-host needs all of them).
#
#   launch/tpu_vm.sh TPU_NAME ZONE "python -m paft_jax.launch export --model gs://... --out ..."
#
# Assumes the repo is checked out at ~/paft_jax on each worker and `make install` has run there.
# jax.distributed is initialized from the TPU metadata when the config sets distributed.auto=true.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE COMMAND" >&2
  exit 2
fi
name=$1 zone=$2
shift 2
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/paft_jax && . .venv/bin/activate && $*"
