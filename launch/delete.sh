#!/usr/bin/env bash
# Delete the TPU VM slice (what is on the workers' disks goes with it; the bucket stays).
#
# usage: launch/delete.sh [--queued] [--dry-run] [--project P] [--zone Z] [--name N] [--queued-resource ID]
#
#   --queued   the slice came from `create.sh --queued`: delete the queued resource and its slice
#
# Needs PROJECT, ZONE, TPU_NAME.  Collect the logs first (collect_logs.sh).
set -euo pipefail
. "$(dirname "$0")/common.sh"

QUEUED=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --queued) QUEUED=1; shift ;;
    *) parse_flag "$@"; shift "$SHIFT" ;;
  esac
done
need PROJECT ZONE TPU_NAME

if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" --project="$PROJECT" --zone="$ZONE" \
    --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
fi
