#!/usr/bin/env bash
# Set up the environment and run every test: unit/end-to-end tests (tests/) and the
# parity suite (parity/). Without CUDA the kernels run in Triton's CPU interpreter with
# the `ci` hypothesis profile. Exits non-zero if any test fails or none ran.
#   scripts/test.sh [--latest] [pytest args...]
# Default: the versions of requirements-lock.txt, in .venv (this is what CI runs).
# --latest: the newest versions pyproject.toml allows, in .venv-latest (the nightly job runs
# it, so that a dependency's new release is caught there; scripts/lock.sh then refreshes the lock).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=()
venv=.venv
if [ "${1:-}" = "--latest" ]; then mode=(--latest); venv=.venv-latest; shift; fi
VENV="$venv" bash scripts/setup.sh ${mode[@]+"${mode[@]}"} test,interpreter,export
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
  export PARITY_PROFILE="${PARITY_PROFILE:-ci}"
fi
workers="${PYTEST_WORKERS:-2}"
exec "$venv/bin/python" -m pytest tests parity -q -n "$workers" "$@"
