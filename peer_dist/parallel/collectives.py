"""The two autograd-aware collectives the model needs, written here on purpose.

``torch.distributed.nn.functional`` has both (``all_reduce``, ``all_to_all_single``),
but since torch 2.13 every call emits a FutureWarning pointing at
``torch.distributed._functional_collectives``, a private module whose collectives
return asynchronous wrapper tensors and carry autograd only for some ops. The
backward rules are one line each (the adjoint of a sum all-reduce is a sum
all-reduce; the adjoint of an all_to_all is the all_to_all with the splits
swapped), so we keep them here, on the public ``torch.distributed`` API, rather than
depend on a deprecated or a private module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with autograd: the backward swaps the splits."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        out_splits, in_splits = ctx.splits
        return _exchange(grad_out, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    """Rows of ``x`` split by ``in_splits`` go to the group's ranks; returns the rows received."""
    if x.requires_grad:
        return _AllToAll.apply(x, out_splits, in_splits, group)
    return _exchange(x, out_splits, in_splits, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum all-reduce with autograd: the backward sums the ranks' incoming gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad = grad_out.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: Tensor, group: Any = None) -> Tensor:
    """Sum of ``x`` over the group's ranks, differentiable."""
    return _AllReduceSum.apply(x, group)
