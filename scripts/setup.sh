#!/usr/bin/env bash
# Creates .venv and installs what the studio needs. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# A plain "torch" would pull a multi-GB CUDA build on machines without one; pin a build only when
# torch is missing (GPU users can install their own CUDA build first).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# The rest through uv when it installs (parallel, from its cache: seconds instead of a minute or two);
# pip otherwise, or with STUDIO_PIP=1. torch is installed by then, so neither replaces it.
install() { python -m pip install -q "$@"; }
if [ -z "${STUDIO_PIP:-}" ] && python -m pip install -q uv >/dev/null 2>&1; then
  # --compile-bytecode: as pip does; without it every process of the first run compiles the libraries again
  install() { python -m uv pip install -q --compile-bytecode --python "$(command -v python)" "$@" ||
                python -m pip install -q "$@"; }
fi
install -r requirements.txt
# The 4-bit NF4 / 8-bit memory tiers use bitsandbytes on NVIDIA GPUs (studio/engine/memory.py).
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  install -r requirements-gpu.txt
fi
if [ "${1:-}" = "--dev" ]; then
  install -r requirements-dev.txt
fi
