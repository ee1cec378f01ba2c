#!/usr/bin/env bash
# Run the PAFT pipeline on every worker of the slice at once (a multi-host JAX program starts on all
# hosts; jax.distributed finds its peers from the TPU metadata):
#
#   python -m paft_jax.launch paft --config CONFIG --no-progress distributed.enabled=true \
#       distributed.auto=true output_dir=gs://BUCKET/runs/RUN [KEY=VALUE ...]
#
# usage: launch/run.sh --config CONFIG [--run RUN] [--detach] [--dry-run] [--project P] [--zone Z]
#                      [--name N] [--bucket B] [KEY=VALUE ...]
#
#   --config CONFIG  a PAFT config, relative to the repository (configs/paft_llama3_8b.yaml)
#   --run RUN        the run's name: its directory gs://BUCKET/runs/RUN/ (default: CONFIG's file stem)
#   --detach         start it under nohup and return; without it, stream worker output here
#   KEY=VALUE        more overrides, after ours (so output_dir=... here replaces the gs:// one)
#
# Each worker appends its output to ~/paft_logs/RUN.log (collect_logs.sh fetches them).  Running the
# same command again continues an interrupted run (finished branches and merge are not redone).
# Needs PROJECT, ZONE, TPU_NAME, BUCKET; install.sh and stage_model.sh first.
set -euo pipefail
. "$(dirname "$0")/common.sh"

CONFIG="" RUN="" DETACH=0 overrides=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config|--run) [[ $# -ge 2 ]] || die "$1 needs a value"
      if [[ $1 == --config ]]; then CONFIG=$2; else RUN=$2; fi; shift 2 ;;
    --config=*) CONFIG=${1#*=}; shift ;;
    --run=*) RUN=${1#*=}; shift ;;
    --detach) DETACH=1; shift ;;
    -*) parse_flag "$@"; shift "$SHIFT" ;;
    *=*) overrides+=("$1"); shift ;;
    *) die "unexpected argument '$1' (overrides are KEY=VALUE; see --help)" ;;
  esac
done
[[ -n $CONFIG ]] || die "--config is required (see --help)"
need PROJECT ZONE TPU_NAME BUCKET
RUN=${RUN:-$(basename "${CONFIG%.*}")}
[[ $RUN =~ ^[A-Za-z0-9._-]+$ ]] || die "--run '$RUN': use letters, digits, . _ - only"

log="~/paft_logs/$RUN.log"
paft=$(quote python -m paft_jax.launch paft --config "$CONFIG" --no-progress \
  distributed.enabled=true distributed.auto=true "output_dir=gs://$BUCKET/runs/$RUN" \
  ${overrides[@]+"${overrides[@]}"})
setup="cd $REMOTE_DIR && . .venv/bin/activate && mkdir -p ~/paft_logs && export PYTHONUNBUFFERED=1"
if [[ $DETACH == 1 ]]; then
  tpu_ssh "$setup && (nohup $paft >> $log 2>&1 < /dev/null &)"
  note "started on every worker of $TPU_NAME; follow it with launch/collect_logs.sh --run $RUN"
else
  tpu_ssh "set -o pipefail; $setup && $paft 2>&1 | tee -a $log"
fi
