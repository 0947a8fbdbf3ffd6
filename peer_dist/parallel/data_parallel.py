"""Data-parallel pieces applied from outside the model.

DeepSpeed averages dense gradients over the data-parallel group. What it cannot do
for us are the layers whose output depends on batch statistics: the PEER/PKM query
BatchNorm (its statistics mix tokens) and the MoE router's auxiliary losses (expert
load fractions over the batch). With data parallelism each rank would use its own
micro-batch statistics and the run would no longer match a single process on the
same global batch. Such modules expose a ``reduce_stats`` hook; we set it to a sum
all-reduce over the data-parallel group, with gradients flowing back through it.

Why the gradients come out right: every rank computes the same function f(S) of the
summed statistics S = sum_q s_q and adds it to its loss. The backward of the sum
all-reduce sums the ranks' incoming gradients (W copies of df/dS), and DeepSpeed's
average over the W ranks divides that back: the update is d f(S) / d theta.
"""

from __future__ import annotations

from functools import partial

import torch.distributed as dist
from torch import nn

from peer_dist.parallel.collectives import all_reduce_sum


def sync_batch_statistics(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Make every module with a ``reduce_stats`` hook sum its statistics over ``group``; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "reduce_stats"):
            module.reduce_stats = partial(all_reduce_sum, group=group)
            count += 1
    return count
