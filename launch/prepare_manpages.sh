#!/usr/bin/env bash
# Phase-B corpus of docs/lifelong.md: English prose from the Debian packages manpages and
# manpages-dev (Linux manual pages: system calls, file formats, overviews), rendered to plain
# text with man, then tokenized like the default corpus (byte level, 128 tokens per sample).
# Usage: bash launch/prepare_manpages.sh [OUT [PREPARE OPTIONS...]]   (OUT defaults to
# data/manpages-byte; further options go to `peer-dist prepare`, e.g. --tune-fraction 0.05)
set -euo pipefail
out=${1:-data/manpages-byte}
shift || true
text=${out}-txt
if ! dpkg -s manpages manpages-dev man-db >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq manpages manpages-dev man-db >/dev/null
fi
mkdir -p "$text"
dpkg -L manpages manpages-dev | grep -E '^/usr/share/man/man[0-9]/.*\.gz$' | sort | while read -r page; do
    name=$(basename "$page" .gz)
    # MANWIDTH fixes the line breaks; col -b drops the overstrike of bold text.
    MANWIDTH=80 man -l "$page" 2>/dev/null | col -b > "$text/$name.txt" || rm -f "$text/$name.txt"
done
find "$text" -empty -delete
.venv/bin/peer-dist prepare "$text" --output "$out" --tokenizer byte --seq-len 128 --samples-per-shard 512 \
    --no-progress "$@"
