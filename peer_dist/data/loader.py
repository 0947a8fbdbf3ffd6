"""Streaming the prepared shards into training and validation batches.

Rank and world size are arguments, taken by the trainer from the launcher: never
webdataset's node splitter (it raises for world > 1), never the environment of a
loader worker (spawned workers under mpirun/srun have no RANK and would read
everything).

Every shard is read whole with webdataset (local paths, ``pipe:`` and http URLs),
checked against the manifest and decoded:

- size and sha256 (``verify``, default on): a tar truncated on a 512-byte block
  boundary parses cleanly with fewer samples, and a flipped byte parses too;
  ``verify="upfront"`` also checks this rank's share of all shards when the training
  stream is opened, before step 1 (verify.py), instead of when each shard is reached;
- sample count and sample shape, always (cheap, and catches the truncation even
  with ``verify`` off).

A failed read of a remote shard (``pipe:``, http), or a read whose bytes fail
these checks, is retried ``read_retries`` times with exponential backoff from
``retry_wait_s`` (see ``manifest.read_retrying``; local files only for transient
OSErrors); the retries and the reads given up on are counted (``read_stats``).
A shard that still fails is handled by the bad-shard policy: ``error`` stops with one
message naming the shard; ``skip`` logs it by name, counts it, and fills each of
its sample slots with the next good sample of the same epoch, so batches keep
their size and every other sample keeps its place in the order.
"""

from __future__ import annotations

import functools
import io
import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peer_dist.data.manifest import SAMPLE_EXT, Manifest, ReadFailed, ReadStats, read_retrying
from peer_dist.data.order import SampleOrder, micro_batch_sample_ids
from peer_dist.data.verify import verify_upfront
from peer_dist.errors import DataError
from peer_dist.fileio import sha256_bytes
from peer_dist.log import get_logger

BAD_SHARD_POLICIES = ("error", "skip")
EVAL_SPLITS = ("val", "tune")  # data.eval_split: what validation evaluates on
VERIFY_MODES = (True, False, "upfront")  # data.verify: check each shard as read / not / also all before step 1
_SHARD_CACHE = 2  # decoded shards kept per process: the current one and its neighbour (one shard at a time)


class ShardProblem(Exception):
    """Why a shard failed its checks (one line, without the shard's name)."""


@dataclass(frozen=True)
class _Failure:
    """A worker's error, carried back as data so the main process raises it cleanly (with its read counts)."""

    message: str
    reads: ReadStats


class ShardReader:
    """Reads, verifies and decodes shards of one split; keeps the last few decoded."""

    def __init__(self, manifest: Manifest, split: str, verify: bool, read_retries: int = 0,
                 retry_wait_s: float = 0.5, cache: int = _SHARD_CACHE) -> None:
        self.manifest, self.split, self.verify, self.cache = manifest, split, verify, cache
        self.read_retries, self.retry_wait_s = read_retries, retry_wait_s
        self.infos = manifest.shards(split)
        self.reads = ReadStats()  # retries and failed reads of this process
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def rows(self, shard: int) -> np.ndarray:
        """(samples, seq_len + 1) tokens of shard ``shard``; raises ShardProblem."""
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        rows = self._load(shard)
        self._cache[shard] = rows
        if len(self._cache) > self.cache:
            self._cache.popitem(last=False)
        return rows

    def location(self, shard: int) -> str:
        return self.manifest.location(self.infos[shard].file)

    def _load(self, shard: int) -> np.ndarray:
        """Read and decode shard ``shard``, retrying as ``read_retrying`` decides; raises ShardProblem."""
        try:
            return read_retrying(self.location(shard), functools.partial(self._decode, shard), self.read_retries,
                                 self.retry_wait_s, self.reads)
        except ReadFailed as failed:
            raise ShardProblem(_describe(failed.error) + failed.after) from None

    def _decode(self, shard: int, data: bytes) -> np.ndarray:
        """Check the bytes of shard ``shard`` against the manifest and decode them; raises ShardProblem."""
        info = self.infos[shard]
        if self.verify:
            if len(data) != info.bytes:
                raise ShardProblem(f"has {len(data)} bytes, the manifest says {info.bytes} (truncated or replaced)")
            if sha256_bytes(data) != info.sha256:
                raise ShardProblem("fails its sha256 check (the file is corrupted or was modified)")
        samples = _decode_tar(data, self.location(shard))
        if len(samples) != info.samples:
            raise ShardProblem(f"holds {len(samples)} samples, the manifest says {info.samples}")
        rows = np.empty((len(samples), self.manifest.sample_len), dtype=np.int64)
        for i, payload in enumerate(samples):
            try:
                row = np.load(io.BytesIO(payload), allow_pickle=False)
            except Exception as exc:
                raise ShardProblem(f"sample {i} is not a readable .npy array ({_one_line(exc)})") from None
            if row.shape != (self.manifest.sample_len,):
                raise ShardProblem(f"sample {i} has shape {row.shape}, expected ({self.manifest.sample_len},)")
            rows[i] = row
        return rows


def _describe(exc: Exception) -> str:
    """What went wrong with a shard, as the rest of a sentence starting with its name."""
    if isinstance(exc, ShardProblem):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    return f"could not be read ({_one_line(exc)})"


def _decode_tar(data: bytes, url: str) -> list[bytes]:
    from webdataset import tariterators

    try:
        files = tariterators.tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
        return [s[SAMPLE_EXT] for s in tariterators.group_by_keys(files) if SAMPLE_EXT in s]
    except Exception as exc:
        raise ShardProblem(f"is not a readable tar file ({_one_line(exc)})") from None


def _check_retries(read_retries: int, retry_wait_s: float) -> None:
    if read_retries < 0 or retry_wait_s < 0:
        raise DataError(f"data.read_retries={read_retries}, data.retry_wait_s={retry_wait_s}: both must be >= 0")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


# ---------------------------------------------------------------------------- training stream


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``j`` of one rank (step j // A, micro-step j % A) -> (B, seq_len + 1) int64 tokens.

    Map-style over an endless index so that a DataLoader with workers returns the
    batches in index order: the sequence is the same for any number of workers.
    """

    def __init__(self, manifest: Manifest, order: SampleOrder, rank: int, world: int, micro_batch_size: int,
                 grad_accum: int, bad_shard: str, verify: bool, read_retries: int, retry_wait_s: float) -> None:
        self.order, self.rank, self.world = order, rank, world
        self.micro_batch_size, self.grad_accum, self.bad_shard = micro_batch_size, grad_accum, bad_shard
        # A micro-batch's samples are consecutive in the order: the shards of one group, then
        # (at a group's end) those of the next, never back and forth; one group plus one fits.
        self.reader = ShardReader(manifest, "train", verify, read_retries, retry_wait_s,
                                  cache=max(_SHARD_CACHE, order.shuffle_shards + 1))
        self.bad: set[int] = set()

    def __getitem__(self, j: int) -> tuple[torch.Tensor, frozenset[str], int, ReadStats] | _Failure:
        """The micro-batch, shards newly found bad, slots refilled, and the read counts since the last item."""
        step, micro = divmod(j, self.grad_accum)
        ids = micro_batch_sample_ids(step, micro, self.rank, self.world, self.micro_batch_size, self.grad_accum)
        rows, new_bad, skipped = [], set(), 0
        for g in ids:
            try:
                row, found, replaced = self._row(g)
            except ShardProblem as exc:  # only raised under bad_shard=error
                return _Failure(str(exc), self.reader.reads.take())
            rows.append(row)
            new_bad |= found
            skipped += replaced
        # The counts travel with the item: a worker process's counters are not visible to the main process.
        return torch.from_numpy(np.stack(rows)), frozenset(new_bad), skipped, self.reader.reads.take()

    def _row(self, g: int) -> tuple[np.ndarray, set[str], int]:
        """The row of global sample ``g`` (or its replacement under skip), newly found bad shards, 0/1 replaced."""
        found: set[str] = set()
        epoch_start = g - g % self.order.epoch_size
        for candidate in range(g, g + self.order.epoch_size):
            c = epoch_start + (candidate - epoch_start) % self.order.epoch_size  # wrap inside the epoch
            shard, index = self.order.locate(c)
            if shard in self.bad:
                continue
            try:
                return self.reader.rows(shard)[index], found, int(c != g)
            except ShardProblem as exc:
                location = self.reader.location(shard)
                if self.bad_shard == "error":
                    raise ShardProblem(
                        f"train shard {location} {exc}; stopping (data.bad_shard=error): re-run prepare, "
                        "restore the file, or set data.bad_shard=skip to train without it") from None
                get_logger().warning("skipping train shard %s: %s (data.bad_shard=skip)", location, exc)
                self.bad.add(shard)
                found.add(location)
        raise ShardProblem("every train shard failed its checks; nothing left to train on (see the warnings)")

    def __len__(self) -> int:  # endless; DataLoader only needs it for its own length, never asked here
        raise TypeError("the training stream is endless")


class _From:
    """Sampler yielding start, start + 1, ... forever."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _as_is(item: Any) -> Any:
    return item


class TrainStream:
    """This rank's micro-batches, step after step, forever (epochs follow each other).

    Yields int64 tensors (micro_batch_size, seq_len + 1). ``consumed_samples`` counts
    the global samples of every step whose micro-batches have all been handed out
    (what a checkpoint stores to resume exactly). ``stats`` counts skipped shards and
    sample slots refilled under ``bad_shard="skip"`` as seen by this rank;
    ``read_stats`` counts ``read_retries`` (attempts repeated after a failed read,
    manifest included) and ``failed_reads`` (reads given up on, after which the
    bad-shard policy applies), summed over this rank's loader processes (each worker
    reads a shard it needs itself) for the batches handed out so far.
    """

    def __init__(self, data_dir: str | Path, rank: int, world: int, micro_batch_size: int, grad_accum: int = 1,
                 seed: int = 0, start_step: int = 0, num_workers: int = 0, bad_shard: str = "error",
                 verify: bool | str = True, read_retries: int = 3, retry_wait_s: float = 0.5,
                 shuffle_shards: int = 1) -> None:
        if bad_shard not in BAD_SHARD_POLICIES:
            raise DataError(f"data.bad_shard={bad_shard!r} is not a policy; allowed: {', '.join(BAD_SHARD_POLICIES)}")
        _check_retries(read_retries, retry_wait_s)
        if not 0 <= rank < world:
            raise DataError(f"rank={rank}, world={world}: the rank must be in 0..world-1")
        if shuffle_shards < 1:
            raise DataError(f"data.shuffle_shards={shuffle_shards}: must be at least 1 (1 = one shard at a time)")
        if micro_batch_size < 1 or grad_accum < 1 or start_step < 0 or num_workers < 0:
            raise DataError(f"micro_batch_size={micro_batch_size}, grad_accum={grad_accum} must be >= 1, "
                            f"start_step={start_step}, num_workers={num_workers} >= 0")
        self._reads = ReadStats()
        self.manifest = Manifest.load(data_dir, read_retries, retry_wait_s, self._reads)
        shards = self.manifest.shards("train")
        if not shards:
            raise DataError(f"{data_dir} has no train shards; re-run `peer-dist prepare`")
        if verify not in VERIFY_MODES:
            raise DataError(f"data.verify={verify!r} is not known; allowed: {', '.join(map(repr, VERIFY_MODES))}")
        if verify == "upfront":
            verify_upfront(self.manifest, rank, world, bad_shard, read_retries)
        self.order = SampleOrder([s.samples for s in shards], seed, shuffle_shards)
        self.rank, self.world, self.seed = rank, world, seed
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.global_batch = micro_batch_size * grad_accum * world
        self.start_step, self.num_workers = start_step, num_workers
        self.bad_shard, self.verify = bad_shard, bool(verify)  # "upfront" keeps checking each read too
        self.read_retries, self.retry_wait_s = read_retries, retry_wait_s
        self.consumed_samples = start_step * self.global_batch
        self._bad_shards: set[str] = set()
        self._skipped_samples = 0

    @property
    def stats(self) -> dict[str, int]:
        return {"skipped_shards": len(self._bad_shards), "skipped_samples": self._skipped_samples}

    @property
    def read_stats(self) -> dict[str, int]:
        # Kept apart from ``stats`` (whose two keys callers compare as a whole); the trainer logs both.
        return {"read_retries": self._reads.retries, "failed_reads": self._reads.failed}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "global_batch": self.global_batch, "seed": self.seed,
                "shuffle_shards": self.order.shuffle_shards, **self.stats, **self.read_stats}

    def __iter__(self) -> Iterator[torch.Tensor]:
        dataset = _MicroBatches(self.manifest, self.order, self.rank, self.world, self.micro_batch_size,
                                self.grad_accum, self.bad_shard, self.verify, self.read_retries, self.retry_wait_s)
        first = self.consumed_samples // self.global_batch * self.grad_accum
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=_From(first), num_workers=self.num_workers, collate_fn=_as_is,
            persistent_workers=False, prefetch_factor=2 if self.num_workers else None,
        )
        for j, item in enumerate(loader, start=first):
            if isinstance(item, _Failure):
                self._reads.add(item.reads)
                raise DataError(item.message)
            batch, found, skipped, reads = item
            self._reads.add(reads)
            self._bad_shards |= found
            self._skipped_samples += skipped
            if (j + 1) % self.grad_accum == 0:  # the step's last micro-batch: the step is consumed
                self.consumed_samples = (j + 1) // self.grad_accum * self.global_batch
            yield batch


# ---------------------------------------------------------------------------- validation


def val_batches(data_dir: str | Path, rank: int, world: int, batch_size: int, max_batches: int | None = None,
                read_retries: int = 3, retry_wait_s: float = 0.5, split: str = "val") -> Iterator[torch.Tensor]:
    """This rank's evaluation batches, int64 (batch_size, seq_len + 1), in a fixed order.

    ``split``: "val" (validation), or "tune" (the tuning split of data prepared with
    ``--tune-fraction``, for choosing hyperparameters apart from validation).
    Batch ``b`` of rank ``r`` is samples ``[(b * world + r) * batch_size, + batch_size)``
    of the split in shard order; every rank gets the same number of
    batches (the collective evaluation needs that), the remainder is left out.
    Validation shards are always verified; a failed read is retried like a training
    shard's (``read_retries``, ``retry_wait_s``), then a bad shard is an error.
    """
    _check_retries(read_retries, retry_wait_s)
    manifest = Manifest.load(data_dir, read_retries, retry_wait_s)
    if split not in EVAL_SPLITS:
        raise DataError(f"evaluation split {split!r}: allowed are {', '.join(EVAL_SPLITS)}")
    total = manifest.num_samples(split)  # DataError naming the splits there are when it is missing
    if total == 0:
        raise DataError(f"{data_dir} has no validation split (it was prepared with val_fraction=0); "
                        "re-run prepare with --val-fraction > 0")
    count = total // (world * batch_size)
    what = "validation" if split == "val" else "tuning"  # in messages; a shard is a "val" or "tune" shard
    if count == 0:
        raise DataError(f"the {what} split of {data_dir} has {total} samples: fewer than one batch per rank "
                        f"({world} ranks x batch size {batch_size}); lower the batch size")
    if max_batches is not None:
        count = min(count, max_batches)
    return _val_iter(ShardReader(manifest, split, True, read_retries, retry_wait_s), rank, world, batch_size, count,
                     split)


def _val_iter(reader: ShardReader, rank: int, world: int, batch_size: int, count: int,
              split: str) -> Iterator[torch.Tensor]:
    ends = np.cumsum([s.samples for s in reader.infos])
    for b in range(count):
        start = (b * world + rank) * batch_size
        rows = []
        for g in range(start, start + batch_size):
            shard = int(np.searchsorted(ends, g, side="right"))
            offset = g - (int(ends[shard - 1]) if shard else 0)
            try:
                rows.append(reader.rows(shard)[offset])
            except ShardProblem as exc:
                raise DataError(f"{split} shard {reader.location(shard)} {exc}; re-run prepare or restore the file") \
                    from None
        yield torch.from_numpy(np.stack(rows))
