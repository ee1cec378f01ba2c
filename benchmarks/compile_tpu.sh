#!/usr/bin/env bash
# Per-chip memory of every 7-8B config, compiled for its TPU slice on this (CPU) machine with libtpu
# (`pip install -e ".[tpu]"`; no TPU needed). Writes benchmarks/results/compile/<name>.{txt,json};
# a config that does not fit (or leaves under 10% of HBM) is a non-zero exit, and its table says why.
# paft_mistral_7b on v5litepod-64 is expected to exit non-zero: libtpu 0.0.42.1 refuses a program on the half
# of a v5e slice that holds chip 0 (docs/tpu.md, known gaps); its other branch fits.
# About 3-6 minutes per config on 2 cores.   bash benchmarks/compile_tpu.sh [name ...]
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/compile
mkdir -p "$OUT"
declare -A RUNS=(
  [paft_llama3_8b_v4-32_after]="configs/paft_llama3_8b.yaml v4-32 llama3-8b"
  [paft_mistral_7b_v5litepod-64_after]="configs/paft_mistral_7b.yaml v5litepod-64 mistral-7b"
  [llama3_8b_sft_v4-32_after]="configs/llama3_8b_sft.yaml v4-32 llama3-8b"
  [llama3_8b_dpo_v4-32_after]="configs/llama3_8b_dpo.yaml v4-32 llama3-8b"
  [mistral_7b_sft_v5litepod-64_after]="configs/mistral_7b_sft.yaml v5litepod-64 mistral-7b"
  [mistral_7b_dpo_v5litepod-64_after]="configs/mistral_7b_dpo.yaml v5litepod-64 mistral-7b"
)
status=0
for name in "${@:-${!RUNS[@]}}"; do
  read -r cfg topo shape <<< "${RUNS[$name]}"
  cmd="python -m paft_jax.launch compile --config $cfg --topology $topo --model-shape $shape --min-headroom 0.1"
  echo "# $cmd" > "$OUT/$name.txt"
  JAX_PLATFORMS=cpu $PY -m paft_jax.launch compile --config "$cfg" --topology "$topo" --model-shape "$shape" \
      --min-headroom 0.1 --no-progress --json "$OUT/$name.json" >> "$OUT/$name.txt" || status=1
  cat "$OUT/$name.txt"
done
exit $status
