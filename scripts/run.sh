#!/usr/bin/env bash
# Set up .venv and run the main job on the built-in tiny default, on the CPU:
#   train (LoRA through TRL on the synthetic skills) -> merge -> GGUF export (f16, q8_0,
#   q4_k_m, each verified numerically through llama.cpp) -> lm-eval of every model.
# Everything lands in runs/default (RUN_DIR to change it); each stage records itself in
# RUN_DIR/manifest.json. `workbench run` (one command, resumable) and `workbench report`
# replace this chain when they land (issue #7).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,interpreter,export
run="${RUN_DIR:-runs/default}"
wb=.venv/bin/workbench
$wb train --run "$run"
$wb merge --run "$run"
$wb export --run "$run" --quant f16,q8_0,q4_k_m
if $wb eval --help >/dev/null 2>&1; then
  $wb eval --run "$run"
fi
echo
echo "run directory: $run (manifest.json lists every artifact with its hash)"
for f in "$run/train/eval.json" "$run/merge/merge_report.json" "$run/eval/comparison.md"; do
  [ -f "$f" ] && echo "  $f"
done
