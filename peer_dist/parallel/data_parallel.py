"""Data-parallel pieces applied from outside the model.

DeepSpeed averages dense gradients over the data-parallel group. What it cannot do
for us is the PEER query BatchNorm: its statistics mix tokens, so with data
parallelism each rank would normalise with its own micro-batch statistics and the
run would no longer match a single process on the same global batch. We hand the
BatchNorm a reducer that sums its [sum, sum of squares, count] vector over the
group, with gradients flowing back through the all-reduce.
"""

from __future__ import annotations

from functools import partial

import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from peer_dist.model.peer import PEER


def _all_reduce_sum(stats: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    # Autograd-aware: the backward of a sum all-reduce is a sum all-reduce of the grads.
    return dist_fn.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)


def sync_query_norms(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Make every PEER query BatchNorm use statistics over ``group``; returns how many."""
    count = 0
    for module in model.modules():
        norm = getattr(module, "query_norm", None) if isinstance(module, PEER) else None
        if norm is not None and hasattr(norm, "reduce_stats"):
            norm.reduce_stats = partial(_all_reduce_sum, group=group)
            count += 1
    return count
