#!/usr/bin/env bash
# LoRA scope / learning-rate / preservation sweep for single KDPO edits on SmolLM2-135M NF4 (CPU),
# N CounterFact records from the shipped sample. Two runs at a time, one torch thread each.
# Usage: bash benchmarks/sweep_single.sh [N]   (results in benchmarks/results/sweep_*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}
PY=${PYTHON:-.venv/bin/python}
ALL='target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]'
run() { name=$1; shift; $PY benchmarks/single_edits.py --n "$N" --threads 1 --out "benchmarks/results/sweep_$name.json" "$@" \
          | grep '^summary' | sed "s/^/$name /"; }
lane_a() {
  run mlp_lr1e-4
  run mlp_lr1e-4_pres1 --set preserve_weight=1
  run mlp_lr1e-4_pres5 --set preserve_weight=5
  run mlp_lr5e-4_pres5 --set learning_rate=5e-4 --set preserve_weight=5
}
lane_b() {
  run down_lr1e-4 --set 'target_modules=[down_proj]'
  run all_lr1e-4 --set "$ALL"
  run all_lr1e-4_pres5 --set "$ALL" --set preserve_weight=5
  run mlp_l0-14_lr1e-4_pres5 --set 'layers=[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14]' --set preserve_weight=5
}
lane_a & lane_b & wait
