#!/usr/bin/env bash
# The main job on the embedded default: install, prepare the default corpus (Python's
# standard library source, byte-level tokens), train the tiny PEER model with 2
# processes under torchrun on CPU, print validation perplexity and the log folder.
# Extra arguments are config overrides, e.g. `bash launch/quickstart.sh train.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV=${PEER_DIST_VENV:-.venv}
DATA=data/stdlib-byte
NPROC=${NPROC:-2}
if [ ! -f "$DATA/manifest.json" ]; then
  "$VENV/bin/peer-dist" prepare --output "$DATA" --tokenizer byte --seq-len 128 \
    --samples-per-shard 512 --max-bytes 6000000
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$VENV/bin/torchrun" --standalone --nproc-per-node "$NPROC" -m peer_dist.cli \
  train --config configs/tiny.toml data.path="$DATA" "$@"
