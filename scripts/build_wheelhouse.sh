#!/usr/bin/env bash
# Build an offline site folder for an air-gapped GPU host (no internet there).
#
#   scripts/build_wheelhouse.sh [OUT_DIR] [REQUIREMENTS_FILE]
#
# The train suite's Unsloth stacks need a second site (their own trl and datasets):
#   scripts/build_wheelhouse.sh .site-unsloth scripts/unsloth-host-packages.txt
# and WORKBENCH_UNSLOTH_SITE=/path/to/that/site on the host (bench/train.py).
#
# Downloads the wheels the host lacks (scripts/gpu-host-packages.txt by default) for
# the host's platform (CPython 3.12, manylinux x86_64; override with PY_VERSION),
# adds the llama-cpp-python wheel from ../shared/wheels when present, unpacks them
# into OUT_DIR/site (pip --target) and trims what a CUDA 13 host never loads:
# bitsandbytes keeps only libbitsandbytes_cuda130.so (3.9 MB of its 43 MB) and its
# CPU library. On the host:
#
#   export PYTHONPATH=$PWD/OUT_DIR/site:$PYTHONPATH
#
# or copy OUT_DIR/site.tar.xz over and unpack it anywhere on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.site}"
reqs="${2:-scripts/gpu-host-packages.txt}"
pyver="${PY_VERSION:-3.12}"
wheels="$out/wheels"
mkdir -p "$wheels"
plat=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64 any; do
  plat+=(--platform "$p")
done
grep -vE '^\s*(#|$)' "$reqs" | while read -r req; do
  echo "[wheelhouse] $req"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
    --implementation cp "${plat[@]}" -d "$wheels" "$req"
done
shared_llama=$(ls ../shared/wheels/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)
if [ "$reqs" != "scripts/gpu-host-packages.txt" ]; then
  :  # another site (the Unsloth one): the main site carries llama-cpp-python
elif [ -n "$shared_llama" ]; then
  echo "[wheelhouse] $(basename "$shared_llama") (from ../shared/wheels)"
  cp "$shared_llama" "$wheels/"
else
  echo "[wheelhouse] no prebuilt llama-cpp-python wheel in ../shared/wheels; GGUF export/eval on the host needs one"
fi
rm -rf "$out/site"
# Install for the host's interpreter, not this one (a py312-only wheel must still unpack here).
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version "$pyver" \
  --implementation cp "${plat[@]}" --target "$out/site" "$wheels"/*.whl
# Trim: a CUDA 13 host loads only these bitsandbytes libraries.
if [ -d "$out/site/bitsandbytes" ]; then
  find "$out/site/bitsandbytes" -name 'libbitsandbytes_*' \
    ! -name 'libbitsandbytes_cuda130.so' ! -name 'libbitsandbytes_cpu.so' -delete
fi
# Unsloth's studio/ is a web app (82 MB) that training never imports.
rm -rf "$out/site/studio"
find "$out/site" -name '__pycache__' -type d -prune -exec rm -rf {} +
tar -C "$out" -cJf "$out/site.tar.xz" site
du -sh "$out/site" "$out/site.tar.xz"
echo "[wheelhouse] done: $(realpath "$out")/site.tar.xz; on the host: tar -xJf site.tar.xz && export PYTHONPATH=\$PWD/site:\$PYTHONPATH"
