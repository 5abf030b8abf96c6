#!/usr/bin/env bash
# LoRA scope / learning-rate sweep for single KDPO edits on SmolLM2-135M NF4 (CPU), 50 CounterFact records.
# Usage: bash benchmarks/sweep_single.sh [N]   (results in benchmarks/results/sweep_*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}
PY=${PYTHON:-.venv/bin/python}
run() { name=$1; shift; $PY benchmarks/single_edits.py --n "$N" --threads 1 --out "benchmarks/results/sweep_$name.json" "$@" | grep '^summary'; }
run mlp_r8_lr1e-4
run mlp_r8_lr5e-4 --set learning_rate=5e-4
run down_r8_lr1e-4 --set 'target_modules=[down_proj]'
run all_r8_lr1e-4 --set 'target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]'
run mlp_l10-20_r8_lr1e-4 --set 'layers=[10,11,12,13,14,15,16,17,18,19,20]'
run mlp_r8_lr1e-4_margin1 --set margin=1.0
