#!/usr/bin/env bash
# Set up .venv and run every test: unit/end-to-end tests (tests/) and the parity
# suite (parity/). Without CUDA the kernels run in Triton's CPU interpreter with the
# `ci` hypothesis profile. Exits non-zero if any test fails or none ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,interpreter,export
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
  export PARITY_PROFILE="${PARITY_PROFILE:-ci}"
fi
workers="${PYTEST_WORKERS:-2}"
exec .venv/bin/python -m pytest tests parity -q -n "$workers" "$@"
