"""`peer-dist bench prepare`: prepare throughput at 1 and 2 workers, byte and BPE tokenizers, and peak memory.

A synthetic JSON Lines corpus is written first (seeded: words of random letters drawn
with Zipf frequencies, so BPE meets a long tail of rare words as in real text), in
files of ``--file-mb``; each file is a chunk. Every measurement is one prepare in a
fresh process (so each peak RSS is that run's own), repeated ``--repeats`` times;
reported are the medians of input MB/s, the scaling ratio (2 workers / 1 worker), the
cores the workers kept busy (their CPU seconds / wall seconds: on a shared machine this
shows how much of the ideal 2x the other load left) with MB/s per busy core, and the
peak RSS of the largest worker and of the coordinating process. BPE runs use a
tokenizer trained once beforehand (``--tokenizer-file``), so only tokenizing is timed.

``--synthetic-gb G`` adds one large prepare (``--big-tokenizer``, 2 workers) of a
G-GB corpus: its peak RSS shows memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from peer_dist.errors import ConfigError

_VOCAB_WORDS = 50_000
_POOL_DOCS = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mb", type=float, default=64.0, help="size of the throughput corpus in MB (default 64)")
    parser.add_argument("--file-mb", type=float, default=8.0, help="size of each corpus file = chunk (default 8)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    parser.add_argument("--tokenizers", default="byte,bpe", help="tokenizers to measure (default byte,bpe)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary (default 8192)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; medians reported (default 3)")
    parser.add_argument("--synthetic-gb", type=float, default=0.0,
                        help="also prepare a corpus of this many GB once and report its peak RSS (default: off)")
    parser.add_argument("--big-tokenizer", choices=("byte", "bpe"), default="byte",
                        help="tokenizer of the --synthetic-gb run (default byte)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary folder, removed after)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")


def run(args: argparse.Namespace) -> int:
    workers = _int_list(args.workers, "--workers")
    kinds = [k.strip() for k in args.tokenizers.split(",") if k.strip()]
    if not kinds or set(kinds) - {"byte", "bpe"}:
        raise ConfigError(f"--tokenizers {args.tokenizers}: allowed is a comma list of byte, bpe")
    if args.mb <= 0 or args.file_mb <= 0 or args.repeats < 1 or args.synthetic_gb < 0:
        raise ConfigError("--mb and --file-mb must be > 0, --repeats >= 1, --synthetic-gb >= 0")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="peer-dist-bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = _throughput(root, args, workers, kinds)
        if args.synthetic_gb:
            results["big"] = _big(root, args)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _throughput(root: Path, args: argparse.Namespace, workers: list[int], kinds: list[str]) -> dict[str, Any]:
    corpus = root / "corpus"
    input_bytes = write_corpus(corpus, int(args.mb * 1e6), int(args.file_mb * 1e6), seed=0)
    tok_file = _train_bpe(root, corpus, args.vocab_size) if "bpe" in kinds else None
    print(f"corpus: {input_bytes / 1e6:.1f} MB of JSONL in {len(list(corpus.iterdir()))} files; "
          f"{args.repeats} runs per setting, medians")
    control = {w: available_cores(w) for w in workers}
    print("control, pure-CPU processes: " + ", ".join(f"{w} got {c:.2f} cores" for w, c in control.items())
          + " (what the machine's other load leaves)")
    print(f"{'tokenizer':>9} {'workers':>7} {'MB/s':>8} {'scaling':>8} {'cores busy':>10} {'MB/s/core':>9} "
          f"{'worker RSS MB':>14} {'main RSS MB':>12}")
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        base = None
        for w in workers:
            runs = [_one_run(corpus, root / "out", kind, tok_file, w, int(args.file_mb * 1e6))
                    for _ in range(args.repeats)]
            rate = statistics.median(r["input_bytes"] / r["seconds"] / 1e6 for r in runs)
            cores = statistics.median(r["worker_cpu_s"] / r["seconds"] for r in runs)
            per_core = statistics.median(r["input_bytes"] / r["worker_cpu_s"] / 1e6 for r in runs)
            base = base if base is not None else rate
            row = {"tokenizer": kind, "workers": w, "mb_per_s": rate, "scaling": rate / base,
                   "cores_busy": cores, "mb_per_cpu_s": per_core,
                   "mb_per_s_runs": [r["input_bytes"] / r["seconds"] / 1e6 for r in runs],
                   "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in runs),
                   "main_peak_rss_mb": max(r["main_peak_rss_mb"] for r in runs)}
            rows.append(row)
            print(f"{kind:>9} {w:>7} {rate:8.2f} {rate / base:7.2f}x {cores:10.2f} {per_core:9.2f} "
                  f"{row['worker_peak_rss_mb']:14.0f} "
                  f"{row['main_peak_rss_mb']:12.0f}", flush=True)
    return {"input_mb": input_bytes / 1e6, "rows": rows, "control_cores": control}


def _big(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    corpus = root / "big-corpus"
    size = write_corpus(corpus, int(args.synthetic_gb * 1e9), 256_000_000, seed=1)
    tok_file = _train_bpe(root, corpus, args.vocab_size) if args.big_tokenizer == "bpe" else None
    r = _one_run(corpus, root / "big-out", args.big_tokenizer, tok_file, 2, 256_000_000)
    print(f"synthetic {size / 1e9:.2f} GB JSONL, {args.big_tokenizer}, 2 workers: {r['seconds']:.0f} s, "
          f"{size / r['seconds'] / 1e6:.1f} MB/s, {r['documents']:,} documents, peak RSS worker "
          f"{r['worker_peak_rss_mb']:.0f} MB, main {r['main_peak_rss_mb']:.0f} MB", flush=True)
    shutil.rmtree(corpus, ignore_errors=True)
    return dict(r, gb=size / 1e9, tokenizer=args.big_tokenizer)


def available_cores(processes: int, seconds: float = 2.0) -> float:
    """Cores that ``processes`` busy-looping processes get together: each spins ``seconds`` of wall
    time and reports the CPU time it got; the sum over ``seconds`` (start-up excluded)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return sum(pool.map(_spin, [seconds] * processes)) / seconds


def _spin(seconds: float) -> float:
    import time

    wall, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - wall < seconds:
        pass
    return time.process_time() - cpu


def _one_run(corpus: Path, out: Path, kind: str, tok_file: Path | None, workers: int,
             chunk_bytes: int) -> dict[str, Any]:
    """One prepare in a fresh process; its stats (seconds, bytes, peak RSS of workers and main)."""
    shutil.rmtree(out, ignore_errors=True)
    spec = {"inputs": [str(corpus)], "output": str(out), "workers": workers, "chunk_bytes": chunk_bytes,
            "tokenizer_file": str(tok_file) if kind == "bpe" else None}
    done = subprocess.run([sys.executable, "-m", "peer_dist.bench.prepare", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"prepare run failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train_bpe(root: Path, corpus: Path, vocab_size: int) -> Path:
    from peer_dist.data.prepare import write_tokenizer

    path = root / "tokenizer.json"
    write_tokenizer([str(corpus)], path, vocab_size=vocab_size, sample_bytes=20_000_000, overwrite=True)
    return path


def write_corpus(folder: Path, total_bytes: int, file_bytes: int, seed: int) -> int:
    """Synthetic JSONL (``{"id": ..., "text": ...}`` per line) of about ``total_bytes``; returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=n)) for n in rng.integers(2, 11, size=_VOCAB_WORDS)]
    ranks = np.minimum(rng.zipf(1.2, size=(_POOL_DOCS, 1200)), _VOCAB_WORDS) - 1
    lengths = rng.integers(50, 1200, size=_POOL_DOCS)
    pool = [" ".join(words[i] for i in ranks[d, : lengths[d]]) for d in range(_POOL_DOCS)]
    written = n = 0
    f = 0
    while written < total_bytes:
        with open(folder / f"part-{f:05d}.jsonl", "w", encoding="utf-8") as fh:
            size = 0
            while size < file_bytes and written + size < total_bytes:
                line = json.dumps({"id": n, "text": f"document {n}: {pool[(n * 7919) % _POOL_DOCS]}"}) + "\n"
                fh.write(line)
                size += len(line)
                n += 1
        written += size
        f += 1
    return written


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text}: give a comma list of positive integers, e.g. 1,2")
    return values


def _main(spec_json: str) -> None:
    """One measured prepare (run by :func:`_one_run` in a fresh process); prints its stats as JSON."""
    from peer_dist.data import prepare
    from peer_dist.data.chunks import peak_rss_mb

    spec = json.loads(spec_json)
    stats: dict[str, Any] = {}
    prepare(spec["inputs"], spec["output"], tokenizer_file=spec["tokenizer_file"], seq_len=2048,
            samples_per_shard=256, val_fraction=0.01, workers=spec["workers"], chunk_bytes=spec["chunk_bytes"],
            stats=stats)
    stats["main_peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(stats))


if __name__ == "__main__":
    _main(sys.argv[1])
