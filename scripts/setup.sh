#!/usr/bin/env bash
# Create a virtual environment at the repo root and install the project into it (editable).
#   scripts/setup.sh [--latest] [EXTRAS]      e.g. scripts/setup.sh test,interpreter,export
# By default the versions come from requirements-lock.txt (what the suite passed with);
# --latest ignores the lock, upgrades to the newest versions pyproject.toml allows and uses
# .venv-latest, so the locked .venv is left as it is. An environment already installed from
# the same pyproject.toml, lock and extras is kept without calling pip.
# TORCH_SPEC: the torch installed first when the environment has none (default torch==2.13.0,
# the CPU wheel; on a CUDA host, install your CUDA torch into the environment first: it is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
latest=0
if [ "${1:-}" = "--latest" ]; then latest=1; shift; fi
extras="${1:-}"
venv="${VENV:-.venv}"
[ "$latest" = 1 ] && venv="${VENV:-.venv-latest}"
PY="${PYTHON:-python3}"
log="$venv/setup.log"   # pip's full output, for when something goes wrong

stamp_now() {
  { cat pyproject.toml; [ "$latest" = 1 ] || cat requirements-lock.txt; echo "extras=$extras latest=$latest"
    ls ../shared/wheels 2>/dev/null || true; } | sha256sum | cut -d' ' -f1
}
if [ "$latest" = 0 ] && [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$(stamp_now)" ] \
   && "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('workbench') is None)" 2>/dev/null; then
  echo "[setup] $venv is current (pyproject.toml, requirements-lock.txt and extras unchanged): install skipped"
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $($PY --version)"
  "$PY" -m venv "$venv"
fi
rm -f "$venv/.installed"
pip_in() { "$venv/bin/python" -m pip "$@" >>"$log" 2>&1 || { echo "[setup] pip $* failed; its output is in $log:"; tail -n 30 "$log"; exit 1; }; }
: >"$log"
pip_in install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  pip_in install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
target="."
[ -n "$extras" ] && target=".[${extras}]"
# An optional wheel cache next to the checkout (a prebuilt llama-cpp-python for the
# export extra); without it pip resolves as usual (and builds llama-cpp-python, ~13 min).
find_links=()
[ -d ../shared/wheels ] && find_links=(--find-links ../shared/wheels)
if [ "$latest" = 1 ]; then
  echo "[setup] installing parity-workbench ($target) with the newest versions pyproject.toml allows"
  pip_in install -q --upgrade --upgrade-strategy eager ${find_links[@]+"${find_links[@]}"} -e "$target"
else
  echo "[setup] installing parity-workbench ($target) from requirements-lock.txt"
  # PIP_CONSTRAINT (not -c) so that the build of the project itself sees the lock too.
  PIP_CONSTRAINT="requirements-lock.txt ${PIP_CONSTRAINT:-}" pip_in install -q ${find_links[@]+"${find_links[@]}"} -e "$target"
fi
"$venv/bin/python" -c "import workbench.kernels as k; print('[setup] ok:', len(k.registry()), 'kernels registered')"
[ "$latest" = 1 ] && "$venv/bin/python" -m pip freeze --exclude-editable >"$venv/versions.txt" \
  && echo "[setup] versions installed: $venv/versions.txt"
stamp_now >"$venv/.installed"
