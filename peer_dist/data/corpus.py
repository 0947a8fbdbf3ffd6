"""Which files make the corpus, how they are cut into chunks, and the bounded samples read from them.

Inputs are files, folders (every file below them, recursively) and glob patterns,
expanded in the order given, each folder or pattern in sorted path order. With no
inputs the corpus is the ``.py`` source of Python's own standard library, present
wherever Python is. How a file is read (text, JSON Lines, Parquet) is in records.py.

Chunks: the files, in corpus order, are grouped into chunks of consecutive files
holding at least ``chunk_bytes`` bytes on disk each (a file is never split, the
last chunk may be smaller). A chunk is the unit of work: one worker tokenizes it
and writes its own shards, so the output depends on the chunks, never on how many
workers or parts share them.

``max_bytes`` keeps the corpus's first ``max_bytes`` bytes of document text (UTF-8),
in corpus order; the document at the cut keeps its head. Finding the cut reads the
corpus up to it (:func:`find_cut`), nothing further.
"""

from __future__ import annotations

import glob
import hashlib
import json
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peer_dist.data.records import DocumentReader, Limit, ReadCounts, ReadOptions
from peer_dist.errors import DataError

_GLOB_CHARS = frozenset("*?[")
SAMPLE_FILES = 64  # the tokenizer sample spreads over at least this many files (when there are)


def default_corpus_files() -> list[Path]:
    """The standard library's ``.py`` files (installed packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))


def expand_inputs(inputs: list[str], exclude: list[Path]) -> list[Path]:
    """Files named by ``inputs`` (files, folders, globs), deduplicated, minus anything under ``exclude``."""
    excluded = [e.resolve() for e in exclude]
    files: list[Path] = []
    for item in inputs:
        if _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"input pattern {item!r} matches no files")
            paths = [Path(m) for m in matches]
        else:
            path = Path(item)
            if not path.exists():
                raise DataError(f"input {item} does not exist (give files, folders or glob patterns)")
            paths = [path]
        for path in paths:
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    seen: set[Path] = set()
    out = []
    for f in files:
        resolved = f.resolve()
        if resolved in seen or any(resolved.is_relative_to(e) for e in excluded):
            continue
        seen.add(resolved)
        out.append(f)
    return out


@dataclass(frozen=True)
class Chunk:
    """Consecutive corpus files; ``limit`` cuts the last file (``max_bytes``)."""

    index: int
    files: tuple[str, ...]
    limit: Limit | None = None

    def documents(self, options: ReadOptions, counts: ReadCounts) -> Iterator[tuple[DocumentReader, str]]:
        """Every document of the chunk in order, with the reader it came from (whose counts go to ``counts``)."""
        for i, path in enumerate(self.files):
            reader = DocumentReader(path, options, self.limit if i == len(self.files) - 1 else None)
            for text in reader:
                yield reader, text
            counts.add(reader.counts)


@dataclass
class Plan:
    """The corpus cut into chunks, and what describes it in the manifest."""

    chunks: list[Chunk]
    info: dict[str, Any]

    @property
    def digest(self) -> str:
        """sha256 of the chunk layout: parts of one prepare must agree on it."""
        layout = [[list(c.files), None if c.limit is None else [c.limit.documents, c.limit.last_bytes]]
                  for c in self.chunks]
        return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def plan_corpus(inputs: list[str], exclude: list[Path], chunk_bytes: int, max_bytes: int | None,
                options: ReadOptions) -> Plan:
    """Expand ``inputs``, group the files into chunks, apply ``max_bytes``."""
    default = not inputs
    files = [str(p) for p in (default_corpus_files() if default else expand_inputs(inputs, exclude))]
    if not files:
        raise DataError(f"inputs {', '.join(inputs)} hold no files")
    chunks: list[Chunk] = []
    group: list[str] = []
    size = 0
    for path in files:
        group.append(path)
        size += Path(path).stat().st_size
        if size >= chunk_bytes:
            chunks.append(Chunk(len(chunks), tuple(group)))
            group, size = [], 0
    if group:
        chunks.append(Chunk(len(chunks), tuple(group)))
    truncated = False
    if max_bytes is not None:
        chunks, truncated = find_cut(chunks, max_bytes, options)
    info: dict[str, Any] = {"default_stdlib": default, "inputs": list(inputs), "truncated": truncated,
                            "text_field": options.text_field, "bad_record": options.bad_record,
                            "chunk_bytes": chunk_bytes, "chunks": len(chunks)}
    if default:
        info["python"] = platform.python_version()
    return Plan(chunks, info)


def find_cut(chunks: list[Chunk], max_bytes: int, options: ReadOptions) -> tuple[list[Chunk], bool]:
    """The chunks that hold the first ``max_bytes`` bytes of text, the last one limited; and whether it cut."""
    total = 0
    for chunk in chunks:
        for f, path in enumerate(chunk.files):
            for d, text in enumerate(DocumentReader(path, options)):
                size = len(text.encode("utf-8"))
                if total + size < max_bytes:
                    total += size
                    continue
                kept = Chunk(chunk.index, chunk.files[: f + 1], Limit(d + 1, max_bytes - total))
                return [*chunks[: chunk.index], kept], True
    return chunks, False


def tokenizer_sample(chunks: list[Chunk], sample_bytes: int, seed: int, options: ReadOptions) -> Iterator[str]:
    """A bounded, seeded sample of the documents to train a tokenizer on.

    The files are visited in the order ``numpy.random.default_rng([seed, 2]).permutation``;
    from each, its documents in order up to ``sample_bytes / min(files, 64)`` bytes of text,
    until ``sample_bytes`` are collected (or every file was visited).
    """
    files = [(path, c.limit if i == len(c.files) - 1 else None) for c in chunks for i, path in enumerate(c.files)]
    per_file = max(1, sample_bytes // min(len(files), SAMPLE_FILES))
    total = 0
    for k in np.random.default_rng([seed, 2]).permutation(len(files)):
        path, limit = files[k]
        taken = 0
        for text in DocumentReader(path, options, limit):
            size = len(text.encode("utf-8"))
            yield text
            taken += size
            total += size
            if total >= sample_bytes:
                return
            if taken >= per_file:
                break
