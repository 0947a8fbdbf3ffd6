#!/usr/bin/env bash
# Build the wheel folder that launch/gpu_check.sh installs on a GPU machine without a
# package registry. Run it here, on a machine with one: our package as a wheel, plus the
# dependencies such a machine's image usually lacks (DeepSpeed, WebDataset and theirs),
# downloaded for its Python (default 3.12, x86-64 Linux). PyTorch, Triton, NumPy and the
# other common packages are expected there already; gpu_check.sh says which import fails.
# Usage: bash launch/gpu_wheels.sh [DIR]   (default dist/gpu-wheels; GPU_PYTHON_VERSION=3.11 ...)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-dist/gpu-wheels}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
TARGET_PY=${GPU_PYTHON_VERSION:-3.12}
# Pinned to what launch/setup.sh installs here, so the GPU machine runs what the tests ran.
PINNED=(webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 zstandard==0.25.0)
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
"$PY" -m pip wheel -q --no-deps -w "$DIR" .
# DeepSpeed is published as a source archive: build its pure-Python wheel (no ops compiled;
# on the GPU machine it JIT-builds what it needs, and we use only torch optimizers).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$DIR" deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "${PINNED[@]}"
ls -1 "$DIR"
