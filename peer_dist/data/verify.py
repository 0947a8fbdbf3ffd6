"""Checking prepared data against its manifest before it is used: `peer-dist verify` and ``data.verify="upfront"``.

Every shard's size and sha256 are compared with the manifest (and the tokenizer
file's sha256 when there is one). Shards are hashed in parallel threads: reading
and ``hashlib`` release the GIL, so threads use several cores without copying
data between processes. A local shard is hashed as it is read, 1 MiB at a time;
a remote one (``pipe:``, http) is read whole, with ``read_retries`` like training.
All problems are collected and reported together in one error.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from peer_dist.data.manifest import Manifest, ReadFailed, ShardInfo, is_remote, read_retrying
from peer_dist.data.tokenizers import TOKENIZER_FILE
from peer_dist.errors import DataError
from peer_dist.fileio import sha256_bytes
from peer_dist.log import get_logger

_BLOCK = 1 << 20
_LISTED = 10  # problems named in the error; the rest are counted


def verify_data(root: str | Path, workers: int = 4, progress: bool = False, read_retries: int = 0) -> Manifest:
    """Check every shard of every split (and tokenizer.json); raises DataError naming each bad file."""
    if workers < 1:
        raise DataError(f"--workers {workers}: must be at least 1")
    manifest = Manifest.load(root, read_retries)
    shards = [(split, s) for split in manifest.splits for s in manifest.shards(split)]
    problems = verify_shards(manifest, shards, workers, progress, read_retries)
    problems += _tokenizer_problem(manifest)
    if problems:
        raise DataError(describe_problems(problems, len(shards), str(root)))
    return manifest


_VERIFIED: set[tuple[str, str, int, int]] = set()  # (root, fingerprint, rank, world) checked in this process


def verify_upfront(manifest: Manifest, rank: int, world: int, bad_shard: str, read_retries: int = 0) -> None:
    """``data.verify="upfront"``: rank ``rank`` of ``world`` checks shards ``rank, rank + world, ...``.

    The shards of every split in manifest order are dealt out over the ranks, so the
    ranks together check every shard once, before the first step. A bad shard stops
    the run under ``bad_shard="error"``; under ``"skip"`` it is logged (training skips
    it when it comes to it). Done once per process for the same data.
    """
    key = (manifest.root, manifest.fingerprint, rank, world)
    if key in _VERIFIED:
        return
    shards = [(split, s) for split in manifest.splits for s in manifest.shards(split)][rank::world]
    started = time.monotonic()
    problems = verify_shards(manifest, shards, min(4, os.cpu_count() or 1), read_retries=read_retries)
    if problems and bad_shard == "error":
        raise DataError(describe_problems(problems, len(shards), manifest.root)
                        + " (data.verify=upfront, data.bad_shard=error)")
    for problem in problems:
        get_logger().warning("%s (data.verify=upfront; data.bad_shard=skip skips it)", problem)
    get_logger().info("data.verify=upfront: checked %d shards (%.1f MB) of %s in %.1f s", len(shards),
                      sum(s.bytes for _, s in shards) / 1e6, manifest.root, time.monotonic() - started)
    _VERIFIED.add(key)


def verify_shards(manifest: Manifest, shards: list[tuple[str, ShardInfo]], workers: int, progress: bool = False,
                  read_retries: int = 0) -> list[str]:
    """One line per shard that fails (``"<split> shard <location> <what is wrong>"``), in manifest order."""
    bar = _bar(sum(s.bytes for _, s in shards), progress)

    def check(item: tuple[str, ShardInfo]) -> str | None:
        split, info = item
        problem = check_shard(manifest.location(info.file), info, read_retries, bar.update if bar else None)
        return None if problem is None else f"{split} shard {manifest.location(info.file)} {problem}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = [p for p in pool.map(check, shards) if p is not None]
    if bar is not None:
        bar.close()
    return found


def check_shard(location: str, info: ShardInfo, read_retries: int = 0,
                advance: Callable[[int], object] | None = None) -> str | None:
    """What is wrong with one shard (the rest of a sentence after its name), or None when it matches."""
    if not is_remote(location):
        return _check_local(Path(location), info, advance)
    try:
        data = read_retrying(location, lambda raw: raw, read_retries)
    except ReadFailed as failed:
        return f"could not be read ({' '.join(str(failed.error).split())[:300]}){failed.after}"
    if advance is not None:
        advance(len(data))
    return _compare(len(data), sha256_bytes(data), info)


def _check_local(path: Path, info: ShardInfo, advance: Callable[[int], object] | None) -> str | None:
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(_BLOCK), b""):
                digest.update(block)
                size += len(block)
                if advance is not None:
                    advance(len(block))
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"could not be read ({exc.strerror or exc})"
    return _compare(size, digest.hexdigest(), info)


def _compare(size: int, sha: str, info: ShardInfo) -> str | None:
    if size != info.bytes:
        return f"has {size} bytes, the manifest says {info.bytes} (truncated or replaced)"
    if sha != info.sha256:
        return "fails its sha256 check (the file is corrupted or was modified)"
    return None


def _tokenizer_problem(manifest: Manifest) -> list[str]:
    info = manifest.info["tokenizer"]
    if "file" not in info or is_remote(manifest.root):
        return []
    path = Path(manifest.root) / info["file"]
    if not path.is_file():
        return [f"{TOKENIZER_FILE} {path} does not exist"]
    if sha256_bytes(path.read_bytes()) != info["sha256"]:
        return [f"{TOKENIZER_FILE} {path} fails its sha256 check (replaced after prepare)"]
    return []


def describe_problems(problems: list[str], checked: int, root: str) -> str:
    """One message for all problems found in ``root``."""
    listed = "; ".join(problems[:_LISTED])
    more = f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
    return (f"{root}: {len(problems)} of {checked} shard(s) fail verification against manifest.json: {listed}{more}. "
            "Re-run `peer-dist prepare` or restore the files")


def _bar(total: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", file=sys.stderr,
                mininterval=0.5, dynamic_ncols=True)
