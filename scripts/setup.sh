#!/usr/bin/env bash
# Create .venv at the repo root and install the project into it (editable).
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test
# TORCH_SPEC overrides the torch requirement installed first (default: torch==2.13.0,
# the CPU wheel this workplace keeps on disk; on a CUDA host keep the torch you have).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
target="."
[ -n "$extras" ] && target=".[${extras}]"
# An optional wheel cache next to the checkout (a prebuilt llama-cpp-python for the
# export extra); without it pip resolves as usual (and builds llama-cpp-python).
find_links=()
[ -d ../shared/wheels ] && find_links=(--find-links ../shared/wheels)
echo "[setup] installing parity-workbench ($target) in editable mode"
.venv/bin/python -m pip install -q ${find_links[@]+"${find_links[@]}"} -e "$target"
.venv/bin/python -c "import workbench.kernels as k; print('[setup] ok:', len(k.registry()), 'kernels registered')"
