#!/usr/bin/env bash
# Set up .venv and run the main job on the built-in tiny default.
# Today that is what exists: the kernel registry and a short parity run of every
# kernel (forward and every gradient against the fp64 reference). The pipeline
# stages (train, merge, export, eval, report) join this command as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,interpreter
.venv/bin/workbench kernels
.venv/bin/workbench parity --examples "${PARITY_EXAMPLES:-5}" --workers 2 -- -k test_parity
