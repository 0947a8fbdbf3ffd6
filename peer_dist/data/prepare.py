"""`peer-dist prepare`: text -> tokens -> fixed-length samples -> WebDataset tar shards + manifest.

Steps (memory stays bounded by one shard, whatever the corpus size):

1. scan the inputs for text documents (corpus.py);
2. for BPE, train the tokenizer on the documents (saved as ``tokenizer.json``);
3. tokenize every document into one token stream on disk, an end-of-text id after
   each document, remembering where each document starts;
4. split train / validation:
   - ``document`` mode: documents are drawn in a seeded random order into the
     validation split until it holds at least ``val_fraction`` of all tokens (and at
     least one sample); a document that would push it past twice the fraction (plus
     one sample) stays in train. Each split is its documents in corpus order.
   - ``sample`` mode, used when a document split is impossible (one document, or
     documents too large for the rule): the stream is cut into samples and a
     contiguous, seeded block of ``round(val_fraction * samples)`` of them is the
     validation split.
5. cut each split's stream into samples of ``seq_len + 1`` tokens (the tail that
   does not fill a sample is dropped) and write them, ``samples_per_shard`` per
   shard, as ``<split>-NNNNNN.tar`` with members ``<index>.tokens.npy``;
6. write ``manifest.json`` (per shard: samples, bytes, sha256).

Everything is written into a temporary sibling folder that replaces the output
folder only when complete: a failed prepare never damages earlier data. Output is
byte-for-byte deterministic for the same inputs and arguments.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from peer_dist.data.corpus import Corpus, scan_corpus
from peer_dist.data.manifest import MANIFEST_FILE, MANIFEST_VERSION, SAMPLE_EXT, Manifest
from peer_dist.data.tokenizers import (TOKENIZER_FILE, BPETokenizer, ByteTokenizer, build_tokenizer,
                                       check_tokenizer_args)
from peer_dist.errors import DataError
from peer_dist.fileio import sha256_file, write_atomic
from peer_dist.log import get_logger

_STREAM_FILE = "stream.tokens"  # temporary: every document's tokens, EOT-separated
_ENCODE_BATCH = 256  # documents per BPE encode_batch call


def prepare(
    inputs: list[str] | tuple[str, ...],
    output: str | Path,
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    seq_len: int = 256,
    samples_per_shard: int = 1024,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_bytes: int | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Prepare ``inputs`` (files, folders, globs; empty: the standard library) into ``output``."""
    _check_args(tokenizer, vocab_size, seq_len, samples_per_shard, val_fraction, max_bytes)
    output = Path(output)
    _check_output(output, overwrite)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    corpus = scan_corpus(list(inputs), exclude=[output, tmp], max_bytes=max_bytes)
    log = get_logger()
    log.info("corpus: %d documents, %d bytes", corpus.info["files"], corpus.info["bytes"])
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _build(corpus, tmp, tokenizer, vocab_size, seq_len, samples_per_shard, val_fraction, seed)
        _swap_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Manifest(manifest.info, output)


def _check_args(tokenizer: str, vocab_size: int, seq_len: int, samples_per_shard: int, val_fraction: float,
                max_bytes: int | None) -> None:
    check_tokenizer_args(tokenizer, vocab_size)
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len}: must be at least 1 token")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard={samples_per_shard}: must be at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}: allowed is 0 <= val_fraction < 1")
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"max_bytes={max_bytes}: must be at least 1 (or unset for the whole corpus)")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise DataError(f"output {output} is a file; give a folder")
    if (output / MANIFEST_FILE).exists():
        if not overwrite:
            raise DataError(f"output {output} already holds prepared data; pass --overwrite to replace it")
    elif output.is_dir() and any(output.iterdir()):
        raise DataError(f"output {output} holds files that are not prepared data; give a new or empty folder")


def _build(corpus: Corpus, tmp: Path, kind: str, vocab_size: int, seq_len: int, samples_per_shard: int,
           val_fraction: float, seed: int) -> Manifest:
    tok = build_tokenizer(kind, vocab_size, corpus.texts())
    tokenizer_info: dict[str, Any] = {"name": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}
    if isinstance(tok, BPETokenizer):
        tok.save(tmp / TOKENIZER_FILE)
        tokenizer_info.update(file=TOKENIZER_FILE, sha256=sha256_file(tmp / TOKENIZER_FILE))
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    doc_ends = _tokenize(corpus, tok, tmp / _STREAM_FILE, dtype)
    stream = np.memmap(tmp / _STREAM_FILE, dtype=dtype, mode="r")
    sample_len = seq_len + 1
    split_info, rows = _split(doc_ends, sample_len, val_fraction, seed, stream)
    splits = {}
    for split in ("train", "val"):
        shards = _write_shards(tmp, split, rows[split], sample_len, samples_per_shard, stream, dtype)
        total = sum(s["samples"] for s in shards)
        splits[split] = {"samples": total, "tokens": total * sample_len, "shards": shards}
    del stream
    (tmp / _STREAM_FILE).unlink()
    body = {
        "version": MANIFEST_VERSION, "format": "webdataset", "sample_ext": SAMPLE_EXT, "seq_len": seq_len,
        "dtype": np.dtype(dtype).name, "tokenizer": tokenizer_info, "corpus": corpus.info,
        "split": split_info, "splits": splits,
    }
    manifest = Manifest.create(body, tmp)
    write_atomic(tmp / MANIFEST_FILE, json.dumps(manifest.info, indent=1, sort_keys=True))
    return manifest


def _tokenize(corpus: Corpus, tok: ByteTokenizer | BPETokenizer, path: Path, dtype: type) -> np.ndarray:
    """Write every document's tokens + EOT to ``path``; returns each document's end offset (exclusive)."""
    ends = []
    total = 0
    texts = corpus.texts()
    with open(path, "wb") as fh:
        while True:
            batch = [t for _, t in zip(range(_ENCODE_BATCH), texts)]
            if not batch:
                break
            encoded = tok.encode_batch(batch) if isinstance(tok, BPETokenizer) else None
            for i, text in enumerate(batch):
                ids = np.asarray(encoded[i], dtype=np.int64) if encoded is not None else tok.encode_array(text)
                fh.write(np.append(ids, tok.eot_id).astype(dtype).tobytes())
                total += len(ids) + 1
                ends.append(total)
    return np.asarray(ends, dtype=np.int64)


def _split(doc_ends: np.ndarray, sample_len: int, val_fraction: float, seed: int,
           stream: np.ndarray) -> tuple[dict[str, Any], dict[str, list[tuple[int, int]]]]:
    """Split description for the manifest, and per split the token ranges (start, end) to cut into samples."""
    starts = np.concatenate([[0], doc_ends[:-1]])
    sizes = doc_ends - starts
    total = int(doc_ends[-1])
    if val_fraction == 0:
        _require_samples(total, sample_len, 1)
        return {"mode": "none"}, {"train": [(0, total)], "val": []}
    val_docs = _pick_val_documents(sizes, val_fraction, sample_len, seed)
    if val_docs is not None:
        ranges: dict[str, list[tuple[int, int]]] = {"train": [], "val": []}
        for d in range(len(sizes)):
            ranges["val" if d in val_docs else "train"].append((int(starts[d]), int(doc_ends[d])))
        info = {"mode": "document", "val_fraction": val_fraction, "seed": seed,
                "val_documents": len(val_docs), "train_documents": len(sizes) - len(val_docs)}
        return info, ranges
    num = total // sample_len
    _require_samples(total, sample_len, 2)
    val_samples = min(max(1, round(val_fraction * num)), num - 1)
    val_start = int(np.random.default_rng([seed, 1]).integers(0, num - val_samples + 1))
    a, b = val_start * sample_len, (val_start + val_samples) * sample_len
    info = {"mode": "sample", "val_fraction": val_fraction, "seed": seed, "val_samples": val_samples,
            "val_start": val_start}
    return info, {"train": [(0, a), (b, num * sample_len)], "val": [(a, b)]}


def _pick_val_documents(sizes: np.ndarray, val_fraction: float, sample_len: int, seed: int) -> set[int] | None:
    """The document-mode rule (module doc); None when it cannot be met."""
    total = int(sizes.sum())
    target = max(math.ceil(val_fraction * total), sample_len)
    cap = 2 * val_fraction * total + sample_len
    chosen: set[int] = set()
    held = 0
    for d in np.random.default_rng([seed, 0]).permutation(len(sizes)):
        if held >= target:
            break
        if held + sizes[d] <= cap:
            chosen.add(int(d))
            held += int(sizes[d])
    if len(sizes) < 2 or held < target or total - held < sample_len:
        return None
    return chosen


def _require_samples(total: int, sample_len: int, needed: int) -> None:
    if total // sample_len < needed:
        raise DataError(f"corpus too small: {total} tokens make {total // sample_len} samples of seq_len + 1 = "
                        f"{sample_len} tokens, at least {needed} needed (lower --seq-len or add text)")


def _write_shards(tmp: Path, split: str, ranges: list[tuple[int, int]], sample_len: int, per_shard: int,
                  stream: np.ndarray, dtype: type) -> list[dict[str, Any]]:
    """Concatenate ``ranges`` of the stream, cut into samples, write shards; returns their manifest entries."""
    writer = _ShardWriter(tmp, split, per_shard)
    pending = np.empty(0, dtype=dtype)
    for start, end in ranges:
        for piece_start in range(start, end, per_shard * sample_len):  # bounded memory: a shard at a time
            piece = stream[piece_start: min(end, piece_start + per_shard * sample_len)]
            pending = np.concatenate([pending, piece])
            whole = len(pending) // sample_len
            for row in pending[: whole * sample_len].reshape(whole, sample_len):
                writer.add(row)
            pending = pending[whole * sample_len:]
    return writer.finish()


class _ShardWriter:
    """Samples -> ``<split>-NNNNNN.tar`` files of ``per_shard`` samples, keys numbered across the split."""

    def __init__(self, folder: Path, split: str, per_shard: int) -> None:
        self.folder, self.split, self.per_shard = folder, split, per_shard
        self.index = 0
        self.shards: list[dict[str, Any]] = []
        self._tar: Any = None
        self._name = ""
        self._count = 0

    def add(self, row: np.ndarray) -> None:
        from webdataset import TarWriter

        if self.index % self.per_shard == 0:
            self._close()
            self._name = f"{self.split}-{self.index // self.per_shard:06d}.tar"
            # Fixed owner and mtime: the same inputs give byte-identical shards.
            self._tar = TarWriter(open(self.folder / self._name, "wb"), user="", group="", mtime=0, encoder=False)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(row), allow_pickle=False)
        self._tar.write({"__key__": f"{self.index:09d}", SAMPLE_EXT: buf.getvalue()})
        self._count += 1
        self.index += 1

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar.stream.close()
        path = self.folder / self._name
        self.shards.append({"file": self._name, "samples": self._count, "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})
        self._tar, self._count = None, 0


def _swap_into_place(tmp: Path, output: Path) -> None:
    """Replace ``output`` by the finished ``tmp`` folder; the old data goes only after the swap."""
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)
