#!/usr/bin/env bash
# The forgetting experiment of docs/lifelong.md from one command: prepares the two corpora when missing
# (phase A: the default corpus, Python source; phase B: launch/prepare_manpages.sh), then runs
# `peer-dist lifelong`, which trains phase A, the variants (a)-(g) at equal phase-B training FLOPs,
# evaluates, and writes results.tsv, results.md and forgetting.png under OUT. Rerun to resume.
# Usage: bash launch/lifelong_experiment.sh [OUT] [B_STEPS] [more peer-dist lifelong options]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/lifelong}
steps=${2:-200}
A=data/stdlib-byte
B=data/manpages-byte
[ -d "$A" ] || .venv/bin/peer-dist prepare --output "$A" --tokenizer byte --seq-len 128 --samples-per-shard 512 \
    --max-bytes 6000000
[ -d "$B" ] || bash launch/prepare_manpages.sh "$B"
exec .venv/bin/peer-dist lifelong --output "$out" --b-steps "$steps" --data-a "$A" --data-b "$B" "${@:3}"
