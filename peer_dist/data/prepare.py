"""`peer-dist prepare`: documents -> tokens -> fixed-length samples -> WebDataset tar shards + manifest.

Steps:

1. plan: expand the inputs, group the files into chunks, apply ``max_bytes`` (corpus.py);
2. tokenizer: the byte tokenizer, a given ``tokenizer.json``, or byte-level BPE trained
   on a bounded, seeded sample of the corpus (``tokenizer_sample_bytes``); saved as
   ``tokenizer.json`` next to the shards, its sha256 in the manifest;
3. every chunk is tokenized, split into train/validation (and, with ``tune_fraction``,
   a tuning split for choosing hyperparameters apart from validation) by a hash of
   each document's pieces and written as its own shards by one of ``workers`` processes (chunks.py);
4. ``manifest.json`` lists the chunks' shards in chunk order (per shard: samples,
   bytes, sha256) with the corpus counts and the split rule.

A chunk's shards depend on that chunk alone, so the output is byte-for-byte the same
for any number of workers, and for any number of parts: ``part=i, num_parts=P``
tokenizes chunks ``c`` with ``c % P == i`` into the output folder and records them in
``part-IIII-of-PPPP.json``; :func:`merge_parts` checks that all parts are there and
agree, and writes the manifest a one-job prepare of the same inputs writes.

A one-job prepare writes into a temporary sibling folder that replaces the output
folder only when complete: a failed prepare never damages earlier data. A part
writes its shards into a temporary folder inside the output and moves them in when
done; a part never replaces another part's files, nor a merged folder.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peer_dist.data.chunks import (PROGRESS_FIELDS, VAL_PIECE_SAMPLES, ChunkJob, init_worker, process_chunk,
                                   split_names)
from peer_dist.data.corpus import Plan, plan_corpus, tokenizer_sample
from peer_dist.data.manifest import MANIFEST_FILE, MANIFEST_VERSION, SAMPLE_EXT, SPLITS, Manifest
from peer_dist.data.records import BAD_RECORD_POLICIES, ReadOptions
from peer_dist.data.tokenizers import FILE_TOKENIZER, TOKENIZER_FILE, BPETokenizer, check_tokenizer_args
from peer_dist.errors import DataError
from peer_dist.fileio import sha256_file, write_atomic
from peer_dist.log import get_logger

CHUNK_BYTES = 64 << 20
TOKENIZER_SAMPLE_BYTES = 100_000_000
_COUNTS = ("files", "documents", "bytes", "skipped_files", "empty_documents", "bad_records")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the output (one prepare, or every part of one)."""

    tokenizer: str
    vocab_size: int
    seq_len: int
    samples_per_shard: int
    val_fraction: float
    seed: int
    max_bytes: int | None
    options: ReadOptions
    tokenizer_file: str | None
    tokenizer_sample_bytes: int
    chunk_bytes: int
    tune_fraction: float = 0.0


def prepare(
    inputs: list[str] | tuple[str, ...],
    output: str | Path,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    seq_len: int = 256,
    samples_per_shard: int = 1024,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_bytes: int | None = None,
    overwrite: bool = False,
    *,
    text_field: str = "text",
    bad_record: str = "error",
    workers: int = 1,
    tokenizer_file: str | Path | None = None,
    tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
    part: int | None = None,
    num_parts: int = 1,
    progress: bool = False,
    stats: dict[str, Any] | None = None,
    tune_fraction: float = 0.0,
) -> Manifest | None:
    """Prepare ``inputs`` (files, folders, globs; empty: the standard library) into ``output``.

    Returns the manifest; a part of a multi-part prepare (``num_parts > 1``) returns None
    (:func:`merge_parts` writes the manifest). ``stats``, when given, receives the
    throughput figures (seconds, input bytes, tokens, peak RSS per worker).
    """
    kind = _resolve_tokenizer(tokenizer, tokenizer_file)
    settings = Settings(kind, vocab_size, seq_len, samples_per_shard, val_fraction, seed, max_bytes,
                        ReadOptions(text_field, bad_record), None if tokenizer_file is None else str(tokenizer_file),
                        tokenizer_sample_bytes, chunk_bytes, tune_fraction)
    _check_args(settings, workers, part, num_parts)
    output = Path(output)
    if num_parts > 1:
        assert part is not None
        _prepare_part(list(inputs), output, settings, part, num_parts, workers, progress, overwrite, stats)
        return None
    _check_output(output, overwrite)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    plan = plan_corpus(list(inputs), [output, tmp], chunk_bytes, max_bytes, settings.options)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        header = _header(plan, settings, tmp)
        results = run_chunks(plan.chunks, header, settings, tmp, workers, progress, stats)
        manifest = Manifest.create(assemble(header, results, plan.info), tmp)
        write_atomic(tmp / MANIFEST_FILE, json.dumps(manifest.info, indent=1, sort_keys=True))
        _swap_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Manifest(manifest.info, output)


def _resolve_tokenizer(tokenizer: str | None, tokenizer_file: str | Path | None) -> str:
    if tokenizer_file is None:
        return tokenizer or "byte"
    if tokenizer not in (None, FILE_TOKENIZER):
        raise DataError(f"--tokenizer {tokenizer} and --tokenizer-file {tokenizer_file}: give one of them "
                        "(--tokenizer-file uses that tokenizer as is)")
    return FILE_TOKENIZER


def _check_args(s: Settings, workers: int, part: int | None, num_parts: int) -> None:
    if s.tokenizer != FILE_TOKENIZER:
        check_tokenizer_args(s.tokenizer, s.vocab_size)
    if s.seq_len < 1:
        raise DataError(f"seq_len={s.seq_len}: must be at least 1 token")
    if s.samples_per_shard < 1:
        raise DataError(f"samples_per_shard={s.samples_per_shard}: must be at least 1")
    if not 0.0 <= s.val_fraction < 1.0:
        raise DataError(f"val_fraction={s.val_fraction}: allowed is 0 <= val_fraction < 1")
    if not 0.0 <= s.tune_fraction < 1.0 or s.val_fraction + s.tune_fraction >= 1.0:
        raise DataError(f"tune_fraction={s.tune_fraction} (with val_fraction={s.val_fraction}): allowed is "
                        "0 <= tune_fraction and val_fraction + tune_fraction < 1 (train keeps the rest)")
    if s.max_bytes is not None and s.max_bytes < 1:
        raise DataError(f"max_bytes={s.max_bytes}: must be at least 1 (or unset for the whole corpus)")
    if s.options.bad_record not in BAD_RECORD_POLICIES:
        raise DataError(f"--bad-record {s.options.bad_record}: allowed: {', '.join(BAD_RECORD_POLICIES)}")
    if not s.options.text_field:
        raise DataError("--text-field is empty: give the name of the field that holds the text (e.g. text)")
    for name, value in (("--workers", workers), ("--tokenizer-sample-bytes", s.tokenizer_sample_bytes),
                        ("--chunk-bytes", s.chunk_bytes), ("--num-parts", num_parts)):
        if value < 1:
            raise DataError(f"{name} {value}: must be at least 1")
    if num_parts > 1 and (part is None or not 0 <= part < num_parts):
        raise DataError(f"--part {part} with --num-parts {num_parts}: give --part in 0..{num_parts - 1}")
    if num_parts == 1 and part not in (None, 0):
        raise DataError(f"--part {part} needs --num-parts greater than {part}")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise DataError(f"output {output} is a file; give a folder")
    if (output / MANIFEST_FILE).exists():
        if not overwrite:
            raise DataError(f"output {output} already holds prepared data; pass --overwrite to replace it")
    elif output.is_dir() and any(output.iterdir()):
        raise DataError(f"output {output} holds files that are not prepared data; give a new or empty folder")


# ---------------------------------------------------------------------------- tokenizer and header


def _header(plan: Plan, s: Settings, folder: Path) -> dict[str, Any]:
    """The manifest without the per-chunk results; sets up ``tokenizer.json`` in ``folder``."""
    info = _tokenizer(plan, s, folder)
    dtype = "uint16" if info["vocab_size"] <= 1 << 16 else "uint32"
    split: dict[str, Any] = {"mode": "none"}
    if s.val_fraction > 0 or s.tune_fraction > 0:
        split = {"mode": "hash", "val_fraction": s.val_fraction, "seed": s.seed,
                 "piece_tokens": VAL_PIECE_SAMPLES * (s.seq_len + 1)}
        if s.tune_fraction > 0:  # absent otherwise: data prepared without it keeps its fingerprint
            split["tune_fraction"] = s.tune_fraction
    return {"version": MANIFEST_VERSION, "format": "webdataset", "sample_ext": SAMPLE_EXT, "seq_len": s.seq_len,
            "samples_per_shard": s.samples_per_shard, "dtype": dtype, "tokenizer": info, "split": split}


def _tokenizer(plan: Plan, s: Settings, folder: Path) -> dict[str, Any]:
    """Byte, a copy of ``--tokenizer-file``, or BPE trained on the sample; its manifest entry."""
    if s.tokenizer == "byte":
        return {"name": "byte", "vocab_size": 257, "eot_id": 256}
    path = folder / TOKENIZER_FILE
    if s.tokenizer == FILE_TOKENIZER:
        assert s.tokenizer_file is not None
        tok = BPETokenizer.load(Path(s.tokenizer_file), FILE_TOKENIZER, given="--tokenizer-file")
        shutil.copyfile(s.tokenizer_file, path)
        extra: dict[str, Any] = {}
    else:
        tok = train_tokenizer(plan, s)
        tok.save(path)
        extra = {"sample_bytes": s.tokenizer_sample_bytes}
    return {"name": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "file": TOKENIZER_FILE,
            "sha256": sha256_file(path), **extra}


def train_tokenizer(plan: Plan, s: Settings) -> BPETokenizer:
    """Byte-level BPE learned from the seeded sample (corpus.tokenizer_sample)."""
    sample = tokenizer_sample(plan.chunks, s.tokenizer_sample_bytes, s.seed, s.options)
    first = next(sample, None)
    if first is None:
        raise _no_text(plan.info, "")
    started = time.monotonic()
    tok = BPETokenizer.train(_chain(first, sample), s.vocab_size)
    get_logger().info("trained BPE (vocab %d) on a sample of up to %d bytes in %.1f s", tok.vocab_size,
                      s.tokenizer_sample_bytes, time.monotonic() - started)
    return tok


def write_tokenizer(inputs: list[str], output: str | Path, vocab_size: int = 4096, seed: int = 0,
                    text_field: str = "text", bad_record: str = "error",
                    sample_bytes: int = TOKENIZER_SAMPLE_BYTES, overwrite: bool = False) -> BPETokenizer:
    """`peer-dist tokenizer`: the BPE a one-job ``prepare --tokenizer bpe`` would train, saved to ``output``.

    Trained once and given to every part with ``--tokenizer-file``, it makes the parts'
    tokenizer one file by construction.
    """
    settings = Settings("bpe", vocab_size, 1, 1, 0.0, seed, None, ReadOptions(text_field, bad_record), None,
                        sample_bytes, CHUNK_BYTES)
    _check_args(settings, 1, None, 1)
    output = Path(output)
    if output.exists() and not overwrite:
        raise DataError(f"{output} exists; pass --overwrite to replace it")
    plan = plan_corpus(list(inputs), [output], CHUNK_BYTES, None, settings.options)
    tok = train_tokenizer(plan, settings)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    tok.save(tmp)
    os.replace(tmp, output)
    return tok


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _no_text(corpus: dict[str, Any], detail: str) -> DataError:
    where = "the standard library" if corpus["default_stdlib"] else ", ".join(corpus["inputs"])
    return DataError(f"no text found in {where}{detail}")


# ---------------------------------------------------------------------------- running the chunks


def run_chunks(chunks: list[Any], header: dict[str, Any], s: Settings, folder: Path, workers: int,
               progress: bool, stats: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Process ``chunks`` with ``workers`` processes into ``folder``; their results in chunk order."""
    jobs = [ChunkJob(c, str(folder), s.options, s.seq_len, s.samples_per_shard, s.val_fraction, s.seed,
                     header["dtype"], s.tune_fraction) for c in chunks]
    tok_file = str(folder / TOKENIZER_FILE) if "file" in header["tokenizer"] else None
    total = sum(Path(p).stat().st_size for c in chunks for p in c.files)
    # spawn: a worker starts clean (no threads inherited from the tokenizer training or the caller).
    ctx = multiprocessing.get_context("spawn")
    shared = ctx.Array("q", len(PROGRESS_FIELDS))
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    bar = _bar(total, progress)
    if jobs:
        with ctx.Pool(min(workers, len(jobs)), init_worker, (tok_file, header["tokenizer"]["name"], shared)) as pool:
            pending = pool.imap(process_chunk, jobs)
            while len(results) < len(jobs):
                try:
                    results.append(pending.next(timeout=0.5))
                except multiprocessing.TimeoutError:
                    pass
                _update_bar(bar, shared, started)
    _update_bar(bar, shared, started)
    if bar is not None:
        bar.close()
    _report(results, total, time.monotonic() - started, workers, stats)
    return results


def _bar(total: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare", file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


def _update_bar(bar: Any, shared: Any, started: float) -> None:
    if bar is None:
        return
    with shared.get_lock():
        done, docs, tokens, _ = list(shared)
    bar.update(done - bar.n)
    elapsed = max(time.monotonic() - started, 1e-9)
    bar.set_postfix_str(f"{docs:,} docs, {tokens:,} tokens, {tokens / elapsed:,.0f} tokens/s", refresh=False)


def _report(results: list[dict[str, Any]], total: int, seconds: float, workers: int,
            stats: dict[str, Any] | None) -> None:
    samples = sum(sh["samples"] for r in results for split in SPLITS if split in r for sh in r[split])
    peak: dict[int, float] = {}
    cpu: dict[int, float] = {}  # per worker process: its CPU time at its last chunk
    for r in results:
        peak[r["pid"]] = max(peak.get(r["pid"], 0.0), r["peak_rss_mb"])
        cpu[r["pid"]] = max(cpu.get(r["pid"], 0.0), r["cpu_s"])
    figures = {"seconds": seconds, "input_bytes": total, "text_bytes": sum(r["bytes"] for r in results),
               "documents": sum(r["documents"] for r in results), "samples": samples, "workers": workers,
               "worker_peak_rss_mb": max(peak.values(), default=0.0), "worker_cpu_s": sum(cpu.values())}
    get_logger().info("prepared %.1f MB of input (%d documents) in %.1f s: %.2f MB/s with %d workers "
                      "(%.2f cores busy), peak RSS per worker %.0f MB", total / 1e6, figures["documents"], seconds,
                      total / 1e6 / max(seconds, 1e-9), workers, figures["worker_cpu_s"] / max(seconds, 1e-9),
                      figures["worker_peak_rss_mb"])
    if stats is not None:
        stats.update(figures)


# ---------------------------------------------------------------------------- the manifest


def assemble(header: dict[str, Any], results: list[dict[str, Any]], corpus: dict[str, Any]) -> dict[str, Any]:
    """The manifest body from the header and every chunk's result (in chunk order)."""
    results = sorted(results, key=lambda r: r["chunk"])
    counts = {k: sum(r[k] for r in results) for k in _COUNTS}
    corpus = dict(corpus, **counts)
    if counts["documents"] == 0:
        first = next((r["first_bad"] for r in results if r["first_bad"]), "")
        raise _no_text(corpus, f": {counts['skipped_files']} file(s) skipped as binary or not UTF-8, "
                               f"{counts['bad_records']} bad record(s)" + (f" (first: {first})" if first else ""))
    sample_len = header["seq_len"] + 1
    splits = {}
    for split in split_names(header["split"].get("tune_fraction", 0.0)):
        shards = [sh for r in results for sh in r[split]]
        samples = sum(sh["samples"] for sh in shards)
        splits[split] = {"samples": samples, "tokens": samples * sample_len, "shards": shards}
    _require_samples(splits, header, counts)
    return dict(header, corpus=corpus, splits=splits)


def _require_samples(splits: dict[str, Any], header: dict[str, Any], counts: dict[str, int]) -> None:
    sample_len = header["seq_len"] + 1
    if splits["train"]["samples"] == 0:
        raise DataError(f"corpus too small: {counts['documents']} documents make no train sample of seq_len + 1 = "
                        f"{sample_len} tokens (lower --seq-len or add text)")
    if header["split"]["mode"] == "hash" and splits["val"]["samples"] == 0:
        raise DataError(f"the validation split is empty: no piece of the {counts['documents']} documents fell in "
                        f"val_fraction={header['split']['val_fraction']} with enough tokens for a sample of "
                        f"{sample_len}; raise --val-fraction, lower --seq-len, add text, or pass --val-fraction 0")
    if "tune" in splits and splits["tune"]["samples"] == 0:
        raise DataError(f"the tuning split is empty: no piece of the {counts['documents']} documents fell in "
                        f"tune_fraction={header['split']['tune_fraction']} with enough tokens for a sample of "
                        f"{sample_len}; raise --tune-fraction, lower --seq-len or add text")


def _swap_into_place(tmp: Path, output: Path) -> None:
    """Replace ``output`` by the finished ``tmp`` folder; the old data goes only after the swap."""
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- parts and merge


def part_file(part: int, num_parts: int) -> str:
    return f"part-{part:04d}-of-{num_parts:04d}.json"


def _prepare_part(inputs: list[str], output: Path, s: Settings, part: int, num_parts: int, workers: int,
                  progress: bool, overwrite: bool, stats: dict[str, Any] | None) -> None:
    """Chunks ``c % num_parts == part`` into ``output``, recorded in its part file (module doc)."""
    if overwrite:
        raise DataError("--overwrite cannot be combined with --part: parts share the output folder; "
                        "remove the folder (or the part's file) yourself to redo it")
    if output.exists() and not output.is_dir():
        raise DataError(f"output {output} is a file; give a folder")
    record = output / part_file(part, num_parts)
    if (output / MANIFEST_FILE).exists():
        raise DataError(f"output {output} already holds merged prepared data; give a new folder for the parts")
    if record.exists():
        raise DataError(f"part {part} of {num_parts} is already prepared in {output} ({record.name}); "
                        f"delete that file to prepare the part again")
    tmp = output / f".{record.stem}.tmp"
    plan = plan_corpus(inputs, [output], s.chunk_bytes, s.max_bytes, s.options)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        header = _header(plan, s, tmp)
        mine = [c for c in plan.chunks if c.index % num_parts == part]
        results = run_chunks(mine, header, s, tmp, workers, progress, stats)
        if "file" in header["tokenizer"]:
            _place_tokenizer(tmp / TOKENIZER_FILE, output / TOKENIZER_FILE, header["tokenizer"]["sha256"], part)
        for name in sorted(p.name for p in tmp.iterdir()):
            os.replace(tmp / name, output / name)
        body = {"part": part, "num_parts": num_parts, "plan": plan.digest, "corpus": plan.info, "header": header,
                "chunks": results}
        write_atomic(record, json.dumps(body, indent=1, sort_keys=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    get_logger().info("part %d of %d: %d of %d chunks prepared into %s", part, num_parts, len(mine),
                      len(plan.chunks), output)


def _place_tokenizer(mine: Path, shared: Path, sha: str, part: int) -> None:
    """Put this part's tokenizer.json next to the shards; another part's must be the same file."""
    if shared.exists() and sha256_file(shared) != sha:
        raise DataError(f"{shared} was written by another part with a different tokenizer than part {part}'s: "
                        "the parts must share one tokenizer; train it once (peer-dist tokenizer) and give it "
                        "to every part with --tokenizer-file")
    tmp = shared.with_name(f".{shared.name}.part-{part}")
    shutil.copyfile(mine, tmp)
    os.replace(tmp, shared)
    mine.unlink()


def merge_parts(output: str | Path) -> Manifest:
    """Check the parts in ``output`` and write its ``manifest.json`` (then drop the part files)."""
    output = Path(output)
    if (output / MANIFEST_FILE).exists():
        raise DataError(f"{output} already holds merged prepared data ({MANIFEST_FILE}); nothing to merge")
    records = {p.name: json.loads(p.read_text()) for p in sorted(output.glob("part-*-of-*.json"))}
    if not records:
        raise DataError(f"{output} holds no part files (part-IIII-of-PPPP.json); run `peer-dist prepare --part I "
                        f"--num-parts P --output {output}` for every part first")
    first_name, first = next(iter(records.items()))
    num_parts = first["num_parts"]
    expected = {part_file(i, num_parts) for i in range(num_parts)}
    if set(records) != expected:
        missing = sorted(expected - set(records))
        other = sorted(set(records) - expected)
        raise DataError(f"{output}: the parts do not match {num_parts} parts: "
                        + (f"missing {', '.join(missing)} (run those parts)" if missing else "")
                        + ("; " if missing and other else "")
                        + (f"{', '.join(other)} belong to another --num-parts (remove them)" if other else ""))
    for name, rec in records.items():
        for key in ("plan", "corpus", "header"):
            if rec[key] != first[key]:
                raise DataError(f"{output}: {name} and {first_name} were prepared with different {_differs(key, rec, first)}; "
                                "every part needs the same inputs and options (re-run the odd part)")
    header = first["header"]
    _check_tokenizer_file(output, header)
    results = [r for rec in records.values() for r in rec["chunks"]]
    if sorted(r["chunk"] for r in results) != list(range(first["corpus"]["chunks"])):
        raise DataError(f"{output}: the parts' chunks are not 0..{first['corpus']['chunks'] - 1} each once")
    _check_shard_files(output, results)
    manifest = Manifest.create(assemble(header, results, first["corpus"]), output)
    write_atomic(output / MANIFEST_FILE, json.dumps(manifest.info, indent=1, sort_keys=True))
    for name in records:
        (output / name).unlink()
    return manifest


def _differs(key: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    """Which setting differs between two parts, in words."""
    if key == "plan":
        return "inputs (the corpus files or their chunking differ)"
    sub_a, sub_b = a[key], b[key]
    diff = sorted(k for k in set(sub_a) | set(sub_b) if sub_a.get(k) != sub_b.get(k))
    return f"{key} settings ({', '.join(diff)})"


def _check_tokenizer_file(output: Path, header: dict[str, Any]) -> None:
    info = header["tokenizer"]
    if "file" in info and sha256_file(output / TOKENIZER_FILE) != info["sha256"]:
        raise DataError(f"{output / TOKENIZER_FILE} is not the tokenizer the parts were prepared with; "
                        "re-run the parts with one --tokenizer-file")


def _check_shard_files(output: Path, results: list[dict[str, Any]]) -> None:
    for r in results:
        for split in SPLITS:
            for shard in r.get(split, []):
                path = output / shard["file"]
                if not path.is_file() or path.stat().st_size != shard["bytes"]:
                    raise DataError(f"{path} is missing or has the wrong size (chunk {r['chunk']}); "
                                    "re-run the part that holds that chunk")
