"""Which text files make the corpus, and reading them as documents.

Inputs are files, folders (every file below them, recursively) and glob patterns,
expanded in the order given, each folder or pattern in sorted path order. Every
file is one document. Files that are not UTF-8 text (invalid UTF-8 or a NUL byte)
are skipped and counted. With no inputs the corpus is the ``.py`` source of
Python's own standard library, present wherever Python is.
"""

from __future__ import annotations

import glob
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer_dist.errors import DataError

_GLOB_CHARS = frozenset("*?[")


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
                raise DataError(f"input {item} does not exist (give text files, folders or glob patterns)")
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


@dataclass
class Document:
    path: Path
    nbytes: int  # UTF-8 bytes used (a document cut by max_bytes keeps only its head)

    def read(self) -> str:
        data = self.path.read_bytes()[: self.nbytes]
        # A cut inside a multi-byte character drops that character's head bytes.
        return data.decode("utf-8", errors="ignore")


@dataclass
class Corpus:
    documents: list[Document]
    info: dict[str, Any] = field(default_factory=dict)

    def texts(self) -> Iterator[str]:
        for doc in self.documents:
            yield doc.read()


def scan_corpus(inputs: list[str], exclude: list[Path], max_bytes: int | None) -> Corpus:
    """Find the documents (text files) and their sizes, stopping once ``max_bytes`` are reached."""
    default = not inputs
    files = default_corpus_files() if default else expand_inputs(inputs, exclude)
    docs: list[Document] = []
    skipped = total = 0
    truncated = False
    for path in files:
        if max_bytes is not None and total >= max_bytes:
            truncated = True
            break
        data = path.read_bytes()
        if not data:
            continue
        if b"\x00" in data or not _is_utf8(data):
            skipped += 1
            continue
        size = len(data)
        if max_bytes is not None and total + size > max_bytes:
            size = len(data[: max_bytes - total].decode("utf-8", errors="ignore").encode("utf-8"))
            truncated = True
        if size:
            docs.append(Document(path, size))
            total += size
    if not docs:
        where = "the standard library" if default else ", ".join(inputs)
        raise DataError(f"no text found in {where}: {skipped} file(s) skipped as binary or not UTF-8")
    info = {"default_stdlib": default, "inputs": list(inputs), "files": len(docs), "skipped_files": skipped,
            "bytes": total, "truncated": truncated}
    if default:
        info["python"] = platform.python_version()
    return Corpus(docs, info)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
