"""Training sample order: a pure function of (shard sizes, seed, epoch, global sample index).

Definition (the tests re-implement it independently):

    n = total train samples; epoch, pos = divmod(g, n) for global sample index g
    shards are visited in the order  rng([seed, epoch, 0]).permutation(num_shards)
    inside shard k samples go in the order  rng([seed, epoch, 1, k]).permutation(count_k)
    sample g is the pos-th (shard, index) pair of that sequence

with ``rng = numpy.random.default_rng``. Shard-major order keeps every rank's reads
local (consecutive indices fall in the same shard) while still shuffling both
levels every epoch.

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

import numpy as np


class SampleOrder:
    """Maps a global sample index to (shard, index in shard)."""

    def __init__(self, counts: list[int], seed: int) -> None:
        if not counts or min(counts) < 1:
            raise ValueError(f"every shard needs at least one sample, got counts {counts[:8]}")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.seed = int(seed)
        self.epoch_size = int(self.counts.sum())
        # Cached per instance: a few epochs and shards are live at a time.
        self._epoch = functools.lru_cache(maxsize=4)(self._epoch_layout)
        self._within = functools.lru_cache(maxsize=64)(self._within_shard)

    def shard_order(self, epoch: int) -> np.ndarray:
        """Shard indices in the order epoch ``epoch`` visits them."""
        return self._epoch(epoch)[0]

    def locate(self, g: int) -> tuple[int, int]:
        """Global sample index -> (shard index, sample index inside that shard)."""
        epoch, pos = divmod(int(g), self.epoch_size)
        order, ends = self._epoch(epoch)
        slot = int(np.searchsorted(ends, pos, side="right"))
        shard = int(order[slot])
        offset = pos - (int(ends[slot - 1]) if slot else 0)
        return shard, int(self._within(epoch, shard)[offset])

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.counts))
        return order, np.cumsum(self.counts[order])

    def _within_shard(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 1, shard]).permutation(int(self.counts[shard]))


def step_sample_ids(step: int, global_batch: int) -> list[int]:
    """Global sample indices consumed by optimizer step ``step`` (0-based)."""
    return list(range(step * global_batch, (step + 1) * global_batch))


def micro_batch_sample_ids(step: int, micro: int, rank: int, world: int, micro_batch_size: int,
                           grad_accum: int) -> list[int]:
    """Global sample indices of micro-step ``micro`` of ``step`` on ``rank`` (see module doc)."""
    global_batch = micro_batch_size * grad_accum * world
    start = step * global_batch + (rank * grad_accum + micro) * micro_batch_size
    return list(range(start, start + micro_batch_size))
