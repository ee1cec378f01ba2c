#!/usr/bin/env bash
# Copy a base model from the bucket to the local disk of every worker: gs://BUCKET/models/NAME/ ->
# MODELS_DIR/NAME/ (the `model:` path of the PAFT configs).  Copied under a temporary name and renamed
# when complete; skipped on a worker that already has MODELS_DIR/NAME.  paft_jax reads a base model from a local HF directory (safetensors);
# every process loads it, and process 0 also streams it into the merge.
#
# usage: launch/stage_model.sh NAME [--dry-run] [--project P] [--zone Z] [--name N] [--bucket B]
#
#   NAME   e.g. Meta-Llama-3-8B-Instruct, uploaded once with
#          gcloud storage cp -r ./Meta-Llama-3-8B-Instruct gs://BUCKET/models/
#
# Needs PROJECT, ZONE, TPU_NAME, BUCKET.  MODELS_DIR defaults to /mnt/disks/models (created with sudo,
# owned by the ssh user; a directory on the boot disk unless a data disk is mounted there).
set -euo pipefail
. "$(dirname "$0")/common.sh"

MODEL=""
while [[ $# -gt 0 ]]; do
  case $1 in
    -*) parse_flag "$@"; shift "$SHIFT" ;;
    *) [[ -z $MODEL ]] || die "one model name, got '$MODEL' and '$1'"; MODEL=$1; shift ;;
  esac
done
[[ -n $MODEL ]] || die "which model? (usage: $0 NAME; see --help)"
need PROJECT ZONE TPU_NAME BUCKET
MODELS_DIR=${MODELS_DIR:-/mnt/disks/models}

dest=$MODELS_DIR/$MODEL tmp=$MODELS_DIR/.$MODEL.partial   # renamed when complete: never half a model
tpu_ssh "set -e
if [ -d $dest ]; then echo \"$dest: already here\"; exit 0; fi
sudo mkdir -p $MODELS_DIR && sudo chown \"\$USER\" $MODELS_DIR
rm -rf $tmp && mkdir $tmp
gcloud storage cp -r gs://$BUCKET/models/$MODEL $tmp/
mv $tmp/$MODEL $dest && rmdir $tmp"
