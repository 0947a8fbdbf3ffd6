#!/usr/bin/env bash
# Create .venv and install everything (torch 2.13.0 first, then the project).
# Idempotent: a stamp records what was installed; rerunning is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PEER_DIST_VENV:-.venv}
TORCH_SPEC=${PEER_DIST_TORCH:-torch==2.13.0}
stamp="$VENV/.peer-dist-installed"
want="$(cat pyproject.toml launch/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: a looser requirement would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
# [gpu] is Triton: its CPU interpreter lets the tests check the fused kernels without a GPU.
# [hf] is transformers: the tests load `peer-dist export --format hf` folders with it.
# [lora] is peft: LoRA adapters (train.lora_rank), the lifelong experiment's variant (g).
"$VENV/bin/python" -m pip install -q -e ".[dev,mpi,gpu,hf,lora]"
# The C kernels of peer_dist.native, compiled now rather than at the first training step.
"$VENV/bin/python" -m peer_dist.native > /dev/null \
  || echo "warning: no C compiler: the CPU kernels fall back to torch (slower)"
echo "$want" > "$stamp"
echo "environment ready: $VENV"
