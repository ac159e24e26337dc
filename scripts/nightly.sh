#!/usr/bin/env bash
# The nightly GPU job, end to end: the parity suite (gpu profile, mutation self-test and the
# >2^31-element cases included), the kernel micro-benchmarks (`pytest bench/`, pytest-benchmark:
# compared with the previous night's JSON, failing on a median 10 % slower, and the report made
# of its JSON), the train, step, accuracy and context suites, and the regression check of
# tonight's kernels (that JSON), train, step and context reports against the previous night's.
# .github/workflows/nightly-gpu.yml calls it; anyone on a GPU host can too.
#
# Usage: scripts/nightly.sh [--short] [--dry-run] [--reports DIR] [--previous DIR] [--runs DIR]
#   --short      a quick end-to-end run (about 10 minutes on one H100): 3 parity examples per
#                (kernel, dtype) without the mutation self-test (each mutant compiles its own
#                kernels: run scripts/gpu_parity.sh for it), the 1B shapes without torch.compile,
#                a few training steps, the
#                built-in accuracy run at 2 seeds and 40 steps, a context search from 2k to 4k
#                tokens. Reports go to reports/nightly-short/<suite> (never mixed with the
#                nightly ones) unless --reports says otherwise. Its verdicts are smoke-test
#                verdicts: 40 steps do not measure accuracy, 3 examples are not the gpu profile.
#   --dry-run    print each command, one a line, instead of running it (tests/test_workflow.py
#                parses them against the CLI)
#   --reports    where the reports go (default reports; with --short reports/nightly-short)
#   --previous   the previous night's reports, <suite>.json each, and kernels.benchmark.json
#                (pytest bench/'s JSON) for the kernels (default previous-reports)
#   --runs       scratch space for the training runs (default $RUNNER_TEMP or /tmp, /nightly-runs)
# Environment: PYTHON (default python3), KERNEL_SHAPE (llama3-8b), TRAIN_SHAPE (llama3.2-1b).
# Every step runs even when an earlier one failed (the workflow's steps did: `if: always()`);
# the exit status is non-zero when any step failed, and the failed steps are named at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

short=0; dry=0; reports=""; previous="previous-reports"; runs="${RUNNER_TEMP:-/tmp}/nightly-runs"
while [ $# -gt 0 ]; do
  case "$1" in
    --short) short=1 ;;
    --dry-run) dry=1 ;;
    --reports) reports="$2"; shift ;;
    --previous) previous="$2"; shift ;;
    --runs) runs="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "nightly.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
KERNEL_SHAPE="${KERNEL_SHAPE:-llama3-8b}"
TRAIN_SHAPE="${TRAIN_SHAPE:-llama3.2-1b}"
if [ -z "$reports" ]; then
  if [ "$short" = 1 ]; then reports="reports/nightly-short"; else reports="reports"; fi
fi

failed=()
step() {  # step NAME CMD...: run (or, with --dry-run, print) one command; remember a failure
  local name="$1"; shift
  if [ "$dry" = 1 ]; then
    printf '%q ' "$@"; echo
    return 0
  fi
  echo "== $name: $*"
  local start=$SECONDS
  "$@"
  local code=$?
  echo "== $name: exit status $code after $((SECONDS - start)) s"
  [ "$code" = 0 ] || failed+=("$name (exit $code)")
}

if [ "$short" = 1 ]; then
  export PARITY_EXAMPLES="${PARITY_EXAMPLES:-3}"
  parity=(-k "not mutant")
  kernels=(--bench-shape llama3.2-1b --bench-no-compile)
  train=(--shape "$TRAIN_SHAPE" --batch 1 --seq 512 --steps 3 --stacks hf,ours)
  stepsuite=(--shape llama3.2-1b --modes lora --stacks hf,ours --autocast on --batch 1 --seq 512 --warmup 1 --steps 3)
  accuracy=(--seeds 0,1 --steps 40 --limit 20 --jobs 4)
  context=(--shape llama3.2-1b --modes qlora --stacks hf-gc,ours-gc --seq 2048 --max-seq 4096 --granularity 2048
           --steps 1 --devices all)
else
  parity=()
  kernels=(--bench-shape "$KERNEL_SHAPE")
  train=(--shape "$TRAIN_SHAPE" --batch 4 --seq 2048 --steps 30)
  # The plain loop peers publish, every stack, with and without autocast, and each stack's profile.
  stepsuite=(--shape "$TRAIN_SHAPE" --modes lora,qlora --stacks hf,ours,liger,unsloth --autocast both --profile)
  # The GPU's larger synthetic setup (builtin:small-llama, 1000 steps, bf16; 142 s on an H200,
  # 2026-11-30). Four seeds measure the noise better than two; eight pipelines at once fit it
  # on one GPU (speed is the train suite's job, so this report's is not measured).
  accuracy=(--config src/workbench/configs/accuracy-gpu.yaml --seeds 0,1,2,3 --jobs 8)
  # The maximum-context search (Llama-3.1-8B shape, QLoRA).
  context=(--shape llama3.1-8b --modes qlora --stacks hf-gc,ours-gc,unsloth-gc,ours-offload --seq 32768
           --max-seq 262144 --granularity 16384 --steps 1 --devices all)
fi

[ "$dry" = 1 ] || { mkdir -p "$reports/kernels" "$runs"; nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader 2>/dev/null || true; }

step parity bash scripts/gpu_parity.sh "$reports/parity" "${parity[@]}"
# The kernels: pytest-benchmark's JSON is their one record (device time per kernel, stack and pass;
# peak memory, floors and versions in extra_info); the report and its plots are made of it.
# A second run on one day gets -2, -3...: a night's record is never overwritten.
kernel_json="$reports/kernels/$(date -u +%F).benchmark.json"
n=2
while [ -e "$kernel_json" ]; do kernel_json="$reports/kernels/$(date -u +%F)-$n.benchmark.json"; n=$((n + 1)); done
kernel_compare=()
if [ "$dry" = 1 ] || [ -f "$previous/kernels.benchmark.json" ]; then  # the first night has no baseline
  kernel_compare=(--benchmark-compare="$previous/kernels.benchmark.json" --benchmark-compare-fail=median:10%)
fi
step kernels "$PY" -m pytest bench/ "${kernels[@]}" --benchmark-json="$kernel_json" "${kernel_compare[@]}"
if [ "$dry" = 1 ] || [ -f "$kernel_json" ]; then
  step "kernels report" "$PY" -m workbench bench kernels --from-json "$kernel_json" --report "$reports/kernels"
else
  echo "no $kernel_json: pytest bench/ stopped before writing it (its step says why)"
fi
step train "$PY" -m workbench bench train "${train[@]}" --run "$runs/bench-train" --report "$reports/train"
step step "$PY" -m workbench bench step "${stepsuite[@]}" --run "$runs/bench-step" --report "$reports/step"
step accuracy "$PY" -m workbench bench accuracy "${accuracy[@]}" --run "$runs/bench-accuracy" \
  --report "$reports/accuracy"
step context "$PY" -m workbench bench context "${context[@]}" --run "$runs/bench-context" \
  --report "$reports/context"

# Regression check of tonight's kernels (pytest bench/'s JSON: times, peak memory, failures), train,
# step and context reports (the newest JSON of each) against the previous night's (the first night,
# or a failed run, has nothing to compare).
[ "$dry" = 1 ] || mkdir -p "$reports/regress"
for suite in kernels train step context; do
  if [ "$suite" = kernels ]; then
    new=""
    if [ "$dry" = 1 ] || [ -f "$kernel_json" ]; then new="$kernel_json"; fi
    old="$previous/kernels.benchmark.json"
  else
    new=$(ls -t "$reports/$suite"/*.json 2>/dev/null | head -n 1 || true)
    old="$previous/$suite.json"
  fi
  if [ "$dry" = 1 ]; then
    step "regress $suite" "$PY" -m workbench regress "$old" "${new:-$reports/$suite/NEWEST.json}" \
      --out "$reports/regress/$suite.md"
  elif [ -z "$new" ] || [ ! -f "$old" ]; then
    echo "no $suite pair to compare (first night, or tonight's run failed)"
  else
    step "regress $suite" "$PY" -m workbench regress "$old" "$new" --out "$reports/regress/$suite.md"
  fi
done

[ "$dry" = 1 ] && exit 0
if [ ${#failed[@]} -gt 0 ]; then
  echo "nightly.sh: ${#failed[@]} step(s) failed: ${failed[*]}"
  exit 1
fi
echo "nightly.sh: every step passed (reports in $reports)"
