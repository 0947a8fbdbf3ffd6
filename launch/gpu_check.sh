#!/usr/bin/env bash
# One-shot check of the CUDA path on a fresh single-GPU machine that has PyTorch, Triton and
# CUDA preinstalled but no package registry. In under 8 minutes it
#   1. installs our package and its missing dependencies from the carried wheel folder
#      (built beforehand with launch/gpu_wheels.sh) into a private folder on PYTHONPATH,
#   2. runs the `gpu` test tier (tests/test_gpu.py, and the Triton kernel tests on the GPU),
#   3. runs `peer-dist bench layer --device cuda` at N = 256^2 and 1024^2, h 8, k 16,
#      d 1024, 16k tokens, bf16,
#   4. trains the tiny config for a short bf16 run on the GPU,
# and writes everything to a results file: $OUT/gpu_check.md when OUT is set, else
# gpu-check/gpu_check.md (logs and the benchmark JSON beside it). Every step runs under
# its own time limit; a failing step is recorded and the next one still runs; the exit
# code is the number of failed steps.
# Usage: bash launch/gpu_check.sh [--wheels DIR] [--out DIR] [--dry-run]
#   --dry-run  check the arguments and the wheel folder, write the results file with the
#              commands each step would run, run nothing (what the CPU tests exercise)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=dist/gpu-wheels
OUT_DIR=${OUT:-gpu-check}
DRY=0
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (allowed: --wheels DIR, --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
if ! ls "$WHEELS"/peer_dist-*.whl >/dev/null 2>&1; then
  echo "gpu_check.sh: no peer_dist wheel in '$WHEELS': build the folder with 'bash launch/gpu_wheels.sh $WHEELS'" \
       "on a machine with a package registry and carry it along" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_check.md"
SITE=${PEER_DIST_SITE:-/tmp/peer-dist-site}
DATA=${PEER_DIST_GPU_DATA:-/tmp/peer-dist-gpu-data}
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FAILED=0

# step NAME LIMIT_S CMD...: run CMD under a time limit, log to $OUT_DIR/NAME.log, append its tail.
step() {
  local name=$1 limit=$2
  shift 2
  {
    echo
    echo "## $name"
    echo
    echo '```'
    echo "\$ $*"
  } >> "$RESULTS"
  if [ "$DRY" = 1 ]; then
    echo "(dry run: not run; limit ${limit} s)" >> "$RESULTS"
    echo '```' >> "$RESULTS"
    return 0
  fi
  local start=$SECONDS rc=0
  # bash -c: a step may be one of the functions below (exported), timeout runs only programs
  timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" > "$OUT_DIR/$name.log" 2>&1 || rc=$?
  tail -n 40 "$OUT_DIR/$name.log" >> "$RESULTS"
  echo "(exit $rc after $((SECONDS - start)) s of ${limit} s)" >> "$RESULTS"
  echo '```' >> "$RESULTS"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  echo "$name: exit $rc, $((SECONDS - start)) s"
}

machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
  nproc
}

install() {
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl &&
    "$PY" -c "import deepspeed, webdataset, zstandard, peer_dist.cli; print('imports ok:', peer_dist.__file__)"
}

prepare() {
  [ -f "$DATA/manifest.json" ] && return 0
  "$PY" -m peer_dist.cli prepare --output "$DATA" --tokenizer byte --seq-len 128 --samples-per-shard 512 \
    --max-bytes 3000000
}

export -f machine install prepare
export PY SITE WHEELS DATA
{
  echo "# peer_dist GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$RESULTS"
# Limits add up to 470 s: the whole check stays under 8 minutes.
step machine 15 machine
step install 60 install
step gpu_tier 200 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py
step bench_layer 130 "$PY" -m peer_dist.cli bench layer --device cuda --dtype bf16 --experts 65536,1048576 \
  --heads 8 --topk 16 --d-model 1024 --tokens 16384 --repeats 5 --reference-max-experts 1048576 \
  --json "$OUT_DIR/bench_layer.json"
step prepare 15 prepare
step train_bf16 50 "$PY" -m peer_dist.cli train --config configs/tiny.toml "data.path=$DATA" \
  "run.dir=$OUT_DIR/runs" run.name=gpu-bf16 train.precision=bf16 train.max_steps=100 train.eval_interval=0 \
  train.ckpt_interval=0 train.progress=false train.micro_batch_size=64
echo >> "$RESULTS"
echo "failed steps: $FAILED" >> "$RESULTS"
echo "results: $RESULTS (failed steps: $FAILED)"
exit "$FAILED"
