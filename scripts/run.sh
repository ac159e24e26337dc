#!/usr/bin/env bash
# Set up .venv and run the main job on the built-in tiny default, on the CPU:
#   `workbench run`: train (LoRA through TRL on the synthetic skills) -> merge -> GGUF
#   export (f16, q8_0, q4_k_m, each verified numerically through llama.cpp) -> lm-eval
#   of every model -> report (Markdown, JSON, plots).
# Everything lands in runs/default (RUN_DIR to change it); each stage records itself in
# RUN_DIR/manifest.json, so running this again skips what is up to date and resumes
# after a failure. Extra arguments go to `workbench run` (e.g. --force export). Then
# `workbench qualify` gates the run (RUN_DIR/qualify/verdict.md); the exit code is
# non-zero when a stage or a gate fails. The libraries' messages go to RUN_DIR/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,interpreter,export
run="${RUN_DIR:-runs/default}"
status=0
.venv/bin/workbench run --run "$run" "$@" || status=$?
[ -f "$run/manifest.json" ] || exit "$status"
echo
verdict=$(mktemp)
trap 'rm -f "$verdict"' EXIT
.venv/bin/workbench qualify --run "$run" >"$verdict" 2>&1 || status=$?
grep -E '^verdict:' "$verdict" || cat "$verdict"
echo "qualify: every gate in $run/qualify/verdict.md"
echo "report: $run/report/report.md"
exit "$status"
