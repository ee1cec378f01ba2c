#!/usr/bin/env bash
# Fetch each worker's log of a run (~/paft_logs/RUN.log, written by run.sh) into OUT/<worker>.log
# (gcloud names them by worker index: 0.log, 1.log, ...), and, when the run has written them, its
# report and merge marker from gs://BUCKET/runs/RUN/ into OUT/.
#
# usage: launch/collect_logs.sh --run RUN [--out OUT] [--dry-run] [--project P] [--zone Z] [--name N]
#                               [--bucket B]
#
#   --out OUT   local directory (default: logs/RUN)
#
# Needs PROJECT, ZONE, TPU_NAME; BUCKET for the report (without it, only the logs).
set -euo pipefail
. "$(dirname "$0")/common.sh"

RUN="" OUT=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --run|--out) [[ $# -ge 2 ]] || die "$1 needs a value"
      if [[ $1 == --run ]]; then RUN=$2; else OUT=$2; fi; shift 2 ;;
    --run=*) RUN=${1#*=}; shift ;;
    --out=*) OUT=${1#*=}; shift ;;
    *) parse_flag "$@"; shift "$SHIFT" ;;
  esac
done
[[ -n $RUN ]] || die "--run is required (see --help)"
need PROJECT ZONE TPU_NAME
OUT=${OUT:-logs/$RUN}

run mkdir -p "$OUT"
tpu_ssh "cat ~/paft_logs/$RUN.log || echo \"(no log for $RUN on this worker)\"" --output-directory="$OUT"
if [[ -n $BUCKET ]]; then
  for f in report.md report.json merge.json; do  # absent until the run gets there: not an error
    run gcloud storage cp "gs://$BUCKET/runs/$RUN/$f" "$OUT/" --project="$PROJECT" || note "no $f yet"
  done
fi
note "logs in $OUT/"
