"""Training sample order: a pure function of (shard sizes, seed, mixing width, epoch, global sample index).

Definition (the tests re-implement it independently):

    n = total train samples; epoch, pos = divmod(g, n) for global sample index g
    shards are visited in the order  rng([seed, epoch, 0]).permutation(num_shards)
    that order is cut into groups of S consecutive shards (S = data.shuffle_shards; the last
    group may be smaller); the groups follow each other
    S = 1: inside shard k samples go in the order  rng([seed, epoch, 1, k]).permutation(count_k)
    S > 1: inside group j, the group's samples (its shards' samples in visiting order, each
           shard's in file order) go in the order  rng([seed, epoch, 2, j]).permutation(size_j)
    sample g is the pos-th (shard, index) pair of that sequence

with ``rng = numpy.random.default_rng``. Prepared shards hold consecutive stretches
of the corpus (documents in input order), so with S = 1 every batch comes from one
stretch of a few hundred samples for many steps in a row: batches are correlated, and
the running statistics of the query BatchNorms follow that stretch rather than the
corpus. S > 1 mixes S stretches in every batch at the cost of keeping S + 1 decoded shards
in memory per loader process. Every sample is still seen once per epoch, reads stay
within the current group, and both levels are shuffled anew each epoch.

Step ``s`` of a run with global batch ``G`` consumes global indices
``[s * G, (s + 1) * G)``. Rank ``r`` of ``W`` with micro-batch ``B`` and ``A``
accumulation steps takes, for micro-step ``m``, the contiguous block starting at
``s * G + (r * A + m) * B``. The set of samples of a step therefore depends only on
``G``, never on how it is split over ranks, micro-batches or loader workers: a
run resumed at another world size with the same global batch continues on exactly
the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from peer_dist.errors import CheckpointError


class SampleOrder:
    """Maps a global sample index to (shard, index in shard)."""

    def __init__(self, counts: list[int], seed: int, shuffle_shards: int = 1) -> None:
        if not counts or min(counts) < 1:
            raise ValueError(f"every shard needs at least one sample, got counts {counts[:8]}")
        if shuffle_shards < 1:
            raise ValueError(f"shuffle_shards must be at least 1, got {shuffle_shards}")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.seed = int(seed)
        self.shuffle_shards = int(shuffle_shards)
        self.epoch_size = int(self.counts.sum())
        # Cached per instance: a few epochs and shards (or groups) are live at a time.
        self._epoch = functools.lru_cache(maxsize=4)(self._epoch_layout)
        self._within = functools.lru_cache(maxsize=64)(self._within_shard)
        self._mixed = functools.lru_cache(maxsize=4)(self._group_order)

    def shard_order(self, epoch: int) -> np.ndarray:
        """Shard indices in the order epoch ``epoch`` visits them (S at a time when mixing)."""
        return self._epoch(epoch)[0]

    def locate(self, g: int) -> tuple[int, int]:
        """Global sample index -> (shard index, sample index inside that shard)."""
        epoch, pos = divmod(int(g), self.epoch_size)
        order, ends = self._epoch(epoch)
        if self.shuffle_shards > 1:
            group_ends = ends[self.shuffle_shards - 1::self.shuffle_shards]
            group = int(np.searchsorted(group_ends, pos, side="right"))
            first = group * self.shuffle_shards
            start = int(ends[first - 1]) if first else 0
            pos = start + int(self._mixed(epoch, group)[pos - start])  # a position inside the same group
        slot = int(np.searchsorted(ends, pos, side="right"))
        shard = int(order[slot])
        offset = pos - (int(ends[slot - 1]) if slot else 0)
        return shard, offset if self.shuffle_shards > 1 else int(self._within(epoch, shard)[offset])

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.counts))
        return order, np.cumsum(self.counts[order])

    def _within_shard(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 1, shard]).permutation(int(self.counts[shard]))

    def _group_order(self, epoch: int, group: int) -> np.ndarray:
        order, _ = self._epoch(epoch)
        size = int(self.counts[order[group * self.shuffle_shards:(group + 1) * self.shuffle_shards]].sum())
        return np.random.default_rng([self.seed, epoch, 2, group]).permutation(size)


def step_sample_ids(step: int, global_batch: int) -> list[int]:
    """Global sample indices consumed by optimizer step ``step`` (0-based)."""
    return list(range(step * global_batch, (step + 1) * global_batch))


def micro_batch_sample_ids(step: int, micro: int, rank: int, world: int, micro_batch_size: int,
                           grad_accum: int) -> list[int]:
    """Global sample indices of micro-step ``micro`` of ``step`` on ``rank`` (see module doc)."""
    global_batch = micro_batch_size * grad_accum * world
    start = step * global_batch + (rank * grad_accum + micro) * micro_batch_size
    return list(range(start, start + micro_batch_size))


def check_sample_order(state: dict[str, Any], shuffle_shards: int, where: str, name: str) -> None:
    """Refuse to continue a checkpoint on another training sample order (data.shuffle_shards).

    A checkpoint without the key was written before it existed, reading one shard at a time (1).
    """
    saved = state.get("shuffle_shards", 1)
    if saved != shuffle_shards:
        raise CheckpointError(
            f"{where} holds a checkpoint ({name}) trained with data.shuffle_shards={saved}, this run has "
            f"data.shuffle_shards={shuffle_shards}: the sample order would change mid-run; continue it with "
            f"data.shuffle_shards={saved}, or pick a new run.name to start over")
