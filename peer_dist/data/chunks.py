"""One chunk of the corpus -> tokens -> train/validation(/tuning) samples -> its own tar shards (run in a worker).

Per document (``tokens`` = its ids followed by the end-of-text id):

1. the document key is ``sha256(UTF-8 text)``;
2. ``tokens`` is cut into pieces of ``piece_tokens`` (= 8 samples of ``seq_len + 1``);
   piece ``p`` goes to validation when ``h = val_hash(seed, key, p) < val_fraction``,
   to the tuning split when ``val_fraction <= h < val_fraction + tune_fraction``, else
   to train. A document shorter than a piece goes whole to one split; a long one
   (a single-file corpus) is spread over the splits in 8-sample pieces, never one block.
   The validation split does not depend on ``tune_fraction`` (the tuning pieces come
   out of train), so adding a tuning split keeps the validation samples as they were;
3. each split's pieces, in corpus order, are concatenated and cut into samples of
   ``seq_len + 1`` tokens; the tail of the chunk's split that does not fill a sample
   is dropped;
4. every ``samples_per_shard`` samples make a shard ``<split>-<chunk>-<n>.tar``
   (6 digits each) with members ``<chunk>-<index>.tokens.npy``.

``val_hash(seed, key, p)`` is ``blake2b(seed as 8 bytes little-endian signed + key
+ p as 8 bytes little-endian, digest_size=8)`` read as a little-endian integer over
2**64. The split of a piece depends on its content, seed and place in its document
only: not on the files around it, the chunking, the workers or the parts.

Memory per worker: the tokenizer, one encode batch of documents, one shard being
built and the largest single document (a text file is one document).
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peer_dist.data.corpus import Chunk
from peer_dist.data.manifest import SAMPLE_EXT
from peer_dist.data.records import DocumentReader, ReadCounts, ReadOptions
from peer_dist.data.tokenizers import BPETokenizer, ByteTokenizer
from peer_dist.fileio import sha256_bytes

VAL_PIECE_SAMPLES = 8
_BATCH_DOCS = 256  # documents per BPE encode_batch call
_BATCH_BYTES = 1 << 20  # ... or fewer when they hold this many bytes
PROGRESS_FIELDS = ("input_bytes", "documents", "tokens", "text_bytes")


def split_names(tune_fraction: float) -> tuple[str, ...]:
    """The splits a prepare writes: train and val, and tune when it has a tuning fraction."""
    return ("train", "val", "tune") if tune_fraction > 0 else ("train", "val")


def val_hash(seed: int, key: bytes, piece: int) -> float:
    """Where piece ``piece`` of the document with key ``key`` falls in [0, 1) (module doc)."""
    data = seed.to_bytes(8, "little", signed=True) + key + piece.to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2 ** 64


@dataclass(frozen=True)
class ChunkJob:
    chunk: Chunk
    folder: str  # where the shards go
    options: ReadOptions
    seq_len: int
    samples_per_shard: int
    val_fraction: float
    seed: int
    dtype: str
    tune_fraction: float = 0.0

    @property
    def splits(self) -> tuple[str, ...]:
        return split_names(self.tune_fraction)

    @property
    def sample_len(self) -> int:
        return self.seq_len + 1


# Set in each worker process by init_worker: the tokenizer and the shared progress counters.
_TOKENIZER: ByteTokenizer | BPETokenizer | None = None
_PROGRESS: Any = None


def init_worker(tokenizer_file: str | None, tokenizer_name: str, progress: Any) -> None:
    """Pool initializer: one tokenizer per worker, single-threaded (a worker is one core)."""
    global _TOKENIZER, _PROGRESS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by `tokenizers` at each batch call
    _TOKENIZER = ByteTokenizer() if tokenizer_file is None else BPETokenizer.load(Path(tokenizer_file), tokenizer_name)
    _PROGRESS = progress


def process_chunk(job: ChunkJob) -> dict[str, Any]:
    """Tokenize, split and write the shards of one chunk; returns its entry for the manifest."""
    tok = _TOKENIZER
    assert tok is not None, "init_worker was not called"
    writers = {s: _SplitWriter(Path(job.folder), s, job) for s in job.splits}
    counts = ReadCounts()
    docs = text_bytes = 0
    progress = _Progress(_PROGRESS)
    for batch, readers in _batches(job.chunk, job.options, counts):
        encoded = tok.encode_batch(batch) if isinstance(tok, BPETokenizer) else [tok.encode_array(t) for t in batch]
        tokens = nbytes = 0
        for text, ids in zip(batch, encoded):
            data = text.encode("utf-8")
            stream = np.append(np.asarray(ids, dtype=np.int64), tok.eot_id)
            _route(stream, hashlib.sha256(data).digest(), job, writers)
            tokens += len(stream)
            nbytes += len(data)
        docs += len(batch)
        text_bytes += nbytes
        progress.add(readers, len(batch), tokens, nbytes)
    progress.finish(job.chunk)
    result = {"chunk": job.chunk.index, "files": len(job.chunk.files), "documents": docs, "bytes": text_bytes,
              "skipped_files": counts.skipped_files, "empty_documents": counts.empty_documents,
              "bad_records": counts.bad_records, "first_bad": counts.first_bad,
              "peak_rss_mb": peak_rss_mb(), "cpu_s": _cpu_seconds(), "pid": os.getpid()}
    for split, writer in writers.items():
        result[split] = writer.finish()
    return result


def _batches(chunk: Chunk, options: ReadOptions,
             counts: ReadCounts) -> Iterator[tuple[list[str], list[DocumentReader]]]:
    """Documents in groups for one encode call (bounded in count and bytes), with the readers seen."""
    batch: list[str] = []
    size = 0
    readers: list[DocumentReader] = []
    for reader, text in chunk.documents(options, counts):
        if not readers or readers[-1] is not reader:
            readers.append(reader)
        batch.append(text)
        size += len(text)
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield batch, readers
            batch, size, readers = [], 0, [reader]
    if batch:
        yield batch, readers


def _route(stream: np.ndarray, key: bytes, job: ChunkJob, writers: dict[str, _SplitWriter]) -> None:
    """Send each piece of one document's token stream to its split (module doc, step 2)."""
    piece_tokens = VAL_PIECE_SAMPLES * job.sample_len
    held_out = job.val_fraction + job.tune_fraction
    for p, start in enumerate(range(0, len(stream), piece_tokens)):
        h = val_hash(job.seed, key, p) if held_out > 0 else 1.0
        split = "val" if h < job.val_fraction else "tune" if h < held_out else "train"
        writers[split].add(stream[start: start + piece_tokens])


class _SplitWriter:
    """One split of one chunk: tokens -> samples -> shards of ``samples_per_shard`` samples."""

    def __init__(self, folder: Path, split: str, job: ChunkJob) -> None:
        self.folder, self.split, self.job = folder, split, job
        self.dtype = np.dtype(job.dtype)
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.rows: list[bytes] = []  # .npy payloads of the shard being built
        self.samples = 0  # written so far in this split of this chunk
        self.shards: list[dict[str, Any]] = []
        self._header = _npy_header(job.sample_len, self.dtype)

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_len += len(tokens)
        if self.pending_len < self.job.sample_len:
            return
        flat = np.concatenate(self.pending)
        whole = len(flat) // self.job.sample_len * self.job.sample_len
        for row in flat[:whole].reshape(-1, self.job.sample_len):
            self.rows.append(self._header + row.astype(self.dtype).tobytes())
            if len(self.rows) == self.job.samples_per_shard:
                self._write_shard()
        self.pending = [flat[whole:]]
        self.pending_len = len(flat) - whole

    def finish(self) -> list[dict[str, Any]]:
        """Write the last, partial shard; the tail that does not fill a sample is dropped."""
        if self.rows:
            self._write_shard()
        return self.shards

    def _write_shard(self) -> None:
        chunk = self.job.chunk.index
        name = f"{self.split}-{chunk:06d}-{len(self.shards):06d}.tar"
        first = self.samples
        buf = io.BytesIO()
        # USTAR, owner and mtime fixed: the same inputs give byte-identical shards.
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, payload in enumerate(self.rows):
                info = tarfile.TarInfo(f"{chunk:06d}-{first + i:07d}.{SAMPLE_EXT}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                tar.addfile(info, io.BytesIO(payload))
        data = buf.getvalue()
        (self.folder / name).write_bytes(data)
        self.shards.append({"file": name, "samples": len(self.rows), "bytes": len(data), "sha256": sha256_bytes(data)})
        self.samples += len(self.rows)
        self.rows = []


def _cpu_seconds() -> float:
    """CPU time (user + system) this worker process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB since it started its program.

    VmHWM, not ``ru_maxrss``: a process started by fork + exec keeps in ``ru_maxrss``
    the peak of the parent it was forked from.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _npy_header(length: int, dtype: np.dtype) -> bytes:
    """The bytes ``np.save`` writes before the data of a (length,) array of ``dtype``."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(length, dtype=dtype), allow_pickle=False)
    return buf.getvalue()[: -length * dtype.itemsize]


class _Progress:
    """Adds this worker's progress to the shared counters (PROGRESS_FIELDS) about twice a second.

    Input bytes are bytes on disk: the files finished plus the position in the current one.
    """

    def __init__(self, shared: Any) -> None:
        self.shared = shared
        self.pending = [0, 0, 0, 0]
        self.reported = self.done = 0  # input bytes reported so far / of the files finished
        self.reader: Any = None
        self.last = time.monotonic()

    def add(self, readers: list[Any], docs: int, tokens: int, text_bytes: int) -> None:
        for reader in readers:
            if reader is not self.reader:
                self.done += self.reader.position if self.reader is not None else 0
                self.reader = reader
        at = self.done + self.reader.position
        self.pending = [self.pending[0] + at - self.reported, self.pending[1] + docs, self.pending[2] + tokens,
                        self.pending[3] + text_bytes]
        self.reported = at
        if time.monotonic() - self.last > 0.5:
            self._flush()

    def finish(self, chunk: Chunk) -> None:
        """Count the whole chunk as read (files that held no document included)."""
        total = sum(Path(p).stat().st_size for p in chunk.files)
        self.pending[0] += total - self.reported
        self.reported = total
        self._flush()

    def _flush(self) -> None:
        if self.shared is not None:
            with self.shared.get_lock():
                for i, v in enumerate(self.pending):
                    self.shared[i] += v
        self.pending = [0, 0, 0, 0]
        self.last = time.monotonic()
