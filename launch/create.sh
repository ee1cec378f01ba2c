#!/usr/bin/env bash
# Create a Cloud TPU VM slice.
#
# usage: launch/create.sh [--queued] [--spot] [--dry-run] [--project P] [--zone Z] [--name N]
#                         [--type T] [--version V] [--queued-resource ID]
#
#   --queued   ask through a queued resource (waits in Google's queue until capacity is free,
#              then polls every 60 s until it is ACTIVE); without it, create the slice now or fail
#   --spot     a Spot slice (cheaper, can be preempted; `launch paft` resumes from its checkpoints)
#
# Needs PROJECT, ZONE, TPU_NAME, ACCELERATOR_TYPE (env or flags; see launch/common.sh).
# RUNTIME_VERSION defaults from the type: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite.
# The workers' service account gets the cloud-platform scope; what it may do in the bucket is then
# decided by IAM (grant it roles/storage.objectAdmin on BUCKET, see docs/tpu.md).
#
#   PROJECT=my-proj ZONE=us-central2-b TPU_NAME=paft-v4 ACCELERATOR_TYPE=v4-32 launch/create.sh --queued
set -euo pipefail
. "$(dirname "$0")/common.sh"

QUEUED=0 SPOT=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    *) parse_flag "$@"; shift "$SHIFT" ;;
  esac
done
need PROJECT ZONE TPU_NAME ACCELERATOR_TYPE
RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}
spot=()
if [[ $SPOT == 1 ]]; then spot=(--spot); fi
scopes=--scopes=https://www.googleapis.com/auth/cloud-platform

if [[ $QUEUED == 0 ]]; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$scopes" ${spot[@]+"${spot[@]}"}
  exit 0
fi

run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --project="$PROJECT" --zone="$ZONE" \
  --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
  "$scopes" ${spot[@]+"${spot[@]}"}
state() {
  run gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --project="$PROJECT" --zone="$ZONE" \
    --format='value(state.state)'
}
if [[ $DRY_RUN == 1 ]]; then
  note "then, every 60 s until it prints ACTIVE (FAILED or SUSPENDED: give up):"
  state
  exit 0
fi
while true; do
  s=$(state)
  note "queued resource $QUEUED_RESOURCE: $s"
  case $s in
    ACTIVE) break ;;
    FAILED|SUSPENDED) die "queued resource $QUEUED_RESOURCE is $s" ;;
  esac
  sleep 60
done
