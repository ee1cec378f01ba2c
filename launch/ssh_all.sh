#!/usr/bin/env bash
# Run any shell command on every worker of the slice at once, in ~/paft_jax with its .venv active
# (what install.sh set up).  For commands other than `launch paft` (run.sh does that one), e.g.:
#
#   launch/ssh_all.sh "python -c 'import jax; print(jax.device_count())'"   # 16 on a v4-32, on each worker
#   launch/ssh_all.sh "python -m paft_jax.launch sft --config configs/llama3_8b_sft.yaml \
#       distributed.enabled=true distributed.auto=true checkpoint.directory=gs://BUCKET/runs/x/sft/checkpoints"
#
# usage: launch/ssh_all.sh [--dry-run] [--project P] [--zone Z] [--name N] [--] COMMAND...
#
#   COMMAND   one shell command line for the workers, or several words (each quoted for the workers)
#
# Needs PROJECT, ZONE, TPU_NAME.
set -euo pipefail
. "$(dirname "$0")/common.sh"

while [[ $# -gt 0 && $1 == -* ]]; do   # our flags first; the first other word starts COMMAND
  if [[ $1 == -- ]]; then shift; break; fi
  parse_flag "$@"; shift "$SHIFT"
done
[[ $# -gt 0 ]] || die "no command (see --help)"
need PROJECT ZONE TPU_NAME

if [[ $# -eq 1 ]]; then cmd=$1; else cmd=$(quote "$@"); fi   # one command line, or words to quote
tpu_ssh "cd $REMOTE_DIR && . .venv/bin/activate && $cmd"
