#!/usr/bin/env bash
# The forgetting experiment of docs/lifelong.md, reduced: phase A on the default corpus (Python
# source), phase B on Linux manual pages (launch/prepare_manpages.sh), variants a-f at equal phase-B
# steps and batch; table (results.tsv) and plot (forgetting.png) under OUT.
# Resumable: a finished step is skipped (train resumes from its checkpoint, grow and usage skip
# outputs that exist). Usage: bash launch/lifelong_experiment.sh [OUT] [B_STEPS]
set -euo pipefail
out=${1:-runs/lifelong}
steps=${2:-100}
A=data/stdlib-byte
B=data/manpages-byte
pd=".venv/bin/peer-dist"
common="train.progress=false train.eval_interval=0 train.ckpt_interval=0 run.dir=$out"
phase_b="data.path=$B train.max_steps=$steps train.warmup_steps=10 train.lr=1e-3 $common"
mkdir -p "$out"
[ -d "$A" ] || $pd prepare --output "$A" --tokenizer byte --seq-len 128 --samples-per-shard 512 --max-bytes 6000000
[ -d "$B" ] || bash launch/prepare_manpages.sh "$B"

# phase A: the default PEER model and its dense counterpart, 300 steps each
$pd train run.name=A-peer $common
$pd train run.name=A-dense model.ffn=dense $common

# phase B
$pd train --init-from "$out/A-dense" run.name=a-dense-ft $phase_b
$pd train --init-from "$out/A-peer" run.name=b-peer-ft $phase_b
for variant in c-grown-frozen d-grown-all; do
    extra=$([ "$variant" = c-grown-frozen ] && echo train.old_expert_lr_scale=0 || true)
    [ -d "$out/$variant" ] || $pd grow "$out/A-peer" --num-experts 65536 -o "$out/$variant" $phase_b $extra \
        | tee "$out/$variant.grow.txt"
    $pd train -c "$out/$variant/config.toml"
done
$pd train --init-from "$out/A-dense" run.name=e-dense-added-peer model.add_peer=residual model.add_peer_blocks=[2] \
    train.trainable=added $phase_b
[ -f "$out/A-peer-usage.pt" ] || $pd usage "$out/A-peer" -o "$out/A-peer-usage.pt" --batches 50
for t in 256 2048; do
    $pd train --init-from "$out/A-peer" run.name=f-sparse-$t train.trainable=experts train.sparse_experts=$t \
        train.sparse_experts_background="$out/A-peer-usage.pt" $phase_b
done

# evaluation: validation loss on A and B data of every run's final checkpoint
for run in A-peer A-dense a-dense-ft b-peer-ft c-grown-frozen d-grown-all e-dense-added-peer f-sparse-256 f-sparse-2048; do
    for data in A B; do
        file="$out/$run.eval-$data.txt"
        [ -s "$file" ] || $pd eval "$out/$run" --data "$([ $data = A ] && echo $A || echo $B)" --batches 40 > "$file"
    done
done
.venv/bin/python launch/lifelong_table.py "$out"
