#!/usr/bin/env bash
# The parity suite on a CUDA host with the `gpu` profile (real shapes), written as a
# report. Works offline: installs the project without dependencies into the host's
# python (torch, triton, hypothesis and pytest must already be there).
# Usage: scripts/gpu_parity.sh [REPORT_DIR] [extra pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
report_dir="${1:-reports/parity}"; shift || true
PY="${PYTHON:-python3}"
if ! "$PY" -c "import workbench.kernels" 2>/dev/null; then
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
    || { echo "could not install the project into $PY (needs setuptools >= 77)"; exit 2; }
fi
workers=1
"$PY" -c "import xdist" 2>/dev/null && workers="${PARITY_WORKERS:-4}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec "$PY" -m workbench parity --profile "${PARITY_PROFILE:-gpu}" --workers "$workers" --report "$report_dir" -- "$@"
