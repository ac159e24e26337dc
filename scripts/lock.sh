#!/usr/bin/env bash
# Refresh requirements-lock.txt: the newest versions pyproject.toml allows, resolved by
# `uv pip compile` for CPython 3.11 on Linux with torch's CPU wheel. Commit the refresh on
# its own, after `bash scripts/test.sh` has passed on it.
#   scripts/lock.sh            # needs network access to the package index
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${TORCH_SPEC:-torch==2.13.0}"
tools="${TMPDIR:-/tmp}/parity-workbench-uv"
if [ ! -x "$tools/bin/uv" ]; then
  python3 -m venv "$tools" && "$tools/bin/pip" install -q uv
fi
overrides=$(mktemp)
trap 'rm -f "$overrides"' EXIT
# The CPU wheel's metadata (PyPI's CUDA build of torch 2.13 asks for another triton).
echo "${TORCH}+cpu" >"$overrides"
# Where the CPU wheel lies: pip's find-links (this workplace keeps it in /opt/wheels).
find_links=()
for d in ${PIP_FIND_LINKS:-} /opt/wheels; do [ -d "$d" ] && find_links+=(--find-links "$d"); done
{
  echo "# The exact versions the test suite passed with (CPython 3.11, Linux, torch 2.13.0 CPU wheel)."
  echo "# scripts/setup.sh installs from it as pip constraints; scripts/lock.sh refreshes it;"
  echo "# scripts/test.sh --latest ignores it and tries the newest versions pyproject.toml allows."
  echo "# torch is left out: its build (CPU or CUDA) is the host's choice (TORCH_SPEC in scripts/setup.sh)."
  "$tools/bin/uv" pip compile pyproject.toml --extra test --extra interpreter --extra export \
    --python-version 3.11 ${find_links[@]+"${find_links[@]}"} \
    --override "$overrides" --no-emit-package torch --no-header -q -o "$overrides.lock"
  cat "$overrides.lock"
} >requirements-lock.txt.new
rm -f "$overrides.lock"
mv requirements-lock.txt.new requirements-lock.txt
echo "[lock] requirements-lock.txt: $(grep -c '^[A-Za-z0-9_.-]*==' requirements-lock.txt) pinned packages"
