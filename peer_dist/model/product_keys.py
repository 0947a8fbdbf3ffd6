"""Exact product-key top-k retrieval (Lample et al. 2019; PEER, He 2024, sec. 2).

Shape suffixes:
    T  tokens    H  heads    K  topk    S  sub-keys per half (n = sqrt(N))
    Q  d_key     C  half key dim (d_key // 2)    M  candidate pairs (see below)

The N = S*S composite keys are k_{a,b} = [c_a ; c'_b], so
q . k_{a,b} = q1 . c_a + q2 . c'_b. Two facts make retrieval exact and cheap:

1. A pair (a, b) in the top-K over all N keys has a in the top-K of q1 . C and b
   in the top-K of q2 . C' (otherwise K better pairs exist with the same b or a).
2. With both side lists sorted descending, the pair of ranks (i, j) (0-based) is
   beaten by every (i', j') with i' <= i, j' <= j: (i+1)(j+1) - 1 pairs. So only
   the M pairs with (i+1)(j+1) <= K can be in the top-K: M = 50 for K = 16
   instead of K^2 = 256, and the final top-K is over M candidates.

Cost per head: O(S * d_key) for the side scores, O(S) for the side top-K, O(M)
for the rest, instead of O(N * d_key) for brute force.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from peer_dist import native
from peer_dist.model.expert_ops import ExpertRouting, bag_sum, segment_sum


# From this many sub-keys per half on, the CPU path computes a query's scores and their top-k
# in one C loop (peer_dist.native.scores_topk) instead of a matmul writing the (rows, n) scores
# and a top-k reading them back: 1.35x faster at n = 512, 1.4x at 1024, no faster at 256
# (one thread, d_key / 2 = 64).
FUSED_SCORES_MIN_KEYS = 512


def candidate_ranks(topk: int) -> list[tuple[int, int]]:
    """The M rank pairs (i, j), 0-based, with (i + 1) * (j + 1) <= topk."""
    return [(i, j) for i in range(topk) for j in range(topk) if (i + 1) * (j + 1) <= topk]


@functools.lru_cache(maxsize=64)
def _candidate_rank_tensors(topk: int, device: torch.device) -> tuple[Tensor, Tensor]:
    # Cached per device: building them every call would be a host->device copy per forward.
    pairs_M2 = torch.tensor(candidate_ranks(topk), dtype=torch.int64).to(device)
    return pairs_M2[:, 0].contiguous(), pairs_M2[:, 1].contiguous()


def product_key_topk(queries_THQ: Tensor, sub_keys_2SC: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """Exact top-``topk`` composite keys for every (token, head) query.

    Args:
        queries_THQ: (T, H, d_key) queries; the first d_key/2 features are q1,
            the rest q2.
        sub_keys_2SC: (2, S, d_key/2) sub-key sets C (index 0) and C' (index 1).
        topk: K, at most S.

    Returns:
        scores_THK: (T, H, K) composite scores q . k_id, differentiable w.r.t.
            queries and sub-keys, in descending order.
        ids_THK: (T, H, K) int64 GLOBAL expert ids a * S + b, i.e. rows of the
            expert tables, never positions in the candidate list.
    """
    num_tokens, heads, d_key = queries_THQ.shape
    _, num_sub, half = sub_keys_2SC.shape
    if sub_keys_2SC.shape[0] != 2 or 2 * half != d_key:
        raise ValueError(f"sub_keys must be (2, S, {d_key // 2}), got {tuple(sub_keys_2SC.shape)}")
    if not 1 <= topk <= num_sub:
        raise ValueError(f"topk must be in [1, {num_sub}], got {topk}")
    q_R2C = queries_THQ.reshape(num_tokens * heads, 2, half)
    side_scores, side_ids = [], []
    for p in range(2):
        top_scores_RK, top_ids_RK = SubKeyTopK.apply(q_R2C[:, p].contiguous(), sub_keys_2SC[p], topk)
        side_scores.append(top_scores_RK)
        side_ids.append(top_ids_RK)
    rank_a, rank_b = _candidate_rank_tensors(topk, queries_THQ.device)
    if native.topk_available(side_scores[0]) and side_scores[1].dtype == torch.float32:
        scores_RK, ids_RK = CandidateTopK.apply(*side_scores, *side_ids, rank_a, rank_b, topk, num_sub)
        return scores_RK.view(num_tokens, heads, topk), ids_RK.view(num_tokens, heads, topk)
    cand_RM = side_scores[0].index_select(1, rank_a) + side_scores[1].index_select(1, rank_b)
    scores_RK, pos_RK = sorted_topk(cand_RM, topk)
    a_RK = side_ids[0].gather(1, rank_a[pos_RK])
    b_RK = side_ids[1].gather(1, rank_b[pos_RK])
    ids_RK = a_RK * num_sub + b_RK
    return scores_RK.view(num_tokens, heads, topk), ids_RK.view(num_tokens, heads, topk)


def sorted_topk(x_RC: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """``x_RC.topk(topk, dim=-1, sorted=True)``; on CPU float32 through the native kernel.

    Autograd flows through the values as through torch.topk (a gather at the chosen columns).
    """
    if not native.topk_available(x_RC):
        return x_RC.topk(topk, dim=-1, sorted=True)
    values_RK, ids_RK = native.topk(x_RC, topk)
    if x_RC.requires_grad and torch.is_grad_enabled():
        values_RK = x_RC.gather(1, ids_RK)
    return values_RK, ids_RK


class CandidateTopK(torch.autograd.Function):
    """The candidate stage of :func:`product_key_topk` on the CPU in one C loop per row
    (peer_dist.native.candidates_topk): the M candidate sums, their sorted top-K, the global ids.

    Backward: a winner's score is side_a[i] + side_b[j], so its gradient goes to both ranks:
        grad_a[r, i] += g[r, k],   grad_b[r, j] += g[r, k]
    """

    @staticmethod
    def forward(ctx: Any, scores_a_RK: Tensor, scores_b_RK: Tensor, ids_a_RK: Tensor, ids_b_RK: Tensor,
                rank_a_M: Tensor, rank_b_M: Tensor, topk: int, num_sub: int) -> tuple[Tensor, Tensor]:
        scores_RK, ids_RK, ranks_a_RK, ranks_b_RK = native.candidates_topk(
            scores_a_RK, scores_b_RK, ids_a_RK, ids_b_RK, rank_a_M, rank_b_M, topk, num_sub)
        ctx.save_for_backward(ranks_a_RK, ranks_b_RK)
        ctx.side_shape = scores_a_RK.shape
        ctx.mark_non_differentiable(ids_RK)
        return scores_RK, ids_RK

    @staticmethod
    def backward(ctx: Any, grad_scores_RK: Tensor, _grad_ids: Tensor | None) -> tuple[Tensor | None, ...]:
        ranks_a_RK, ranks_b_RK = ctx.saved_tensors
        grad_scores_RK = grad_scores_RK.contiguous()
        grad_a = grad_scores_RK.new_zeros(ctx.side_shape).scatter_add_(1, ranks_a_RK, grad_scores_RK)
        grad_b = grad_scores_RK.new_zeros(ctx.side_shape).scatter_add_(1, ranks_b_RK, grad_scores_RK)
        return grad_a, grad_b, None, None, None, None, None, None


class SubKeyTopK(torch.autograd.Function):
    """Sorted top-K of scores = q (R, C) @ keys (S, C)^T per row; returns (scores, ids), both (R, K).

    Autograd through ``topk`` would scatter the (R, K) gradient into a dense (R, S)
    zero tensor and run two (R, S) matmuls. Only K of the S columns are non-zero,
    so the backward here uses the expert-table primitives with sub-keys as rows:
        grad_q[r]    = sum_k g[r, k] * keys[id[r, k]]        (bag-sum)
        grad_keys[s] = sum over (r, k) with id == s of g[r, k] * q[r]   (segment sum)
    """

    @staticmethod
    def forward(ctx: Any, q_RC: Tensor, keys_SC: Tensor, topk: int) -> tuple[Tensor, Tensor]:
        if keys_SC.shape[0] >= FUSED_SCORES_MIN_KEYS and native.topk_available(q_RC) and keys_SC.dtype == q_RC.dtype:
            top_scores_RK, top_ids_RK = native.scores_topk(q_RC, keys_SC, topk)
        else:
            scores_RS = q_RC @ keys_SC.t()  # transient; the largest tensor of retrieval
            top_scores_RK, top_ids_RK = sorted_topk(scores_RS, topk)
        ctx.save_for_backward(q_RC, keys_SC, top_ids_RK)
        ctx.mark_non_differentiable(top_ids_RK)
        return top_scores_RK, top_ids_RK

    @staticmethod
    def backward(ctx: Any, grad_scores_RK: Tensor, _grad_ids: Tensor | None) -> tuple[Tensor | None, ...]:
        q_RC, keys_SC, top_ids_RK = ctx.saved_tensors
        routing = ExpertRouting.build(top_ids_RK, keys_SC.shape[0])
        grad_scores_P = grad_scores_RK.reshape(-1).contiguous()
        grad_q = bag_sum(grad_scores_P, keys_SC, routing) if ctx.needs_input_grad[0] else None
        grad_keys = segment_sum(q_RC, grad_scores_P, routing, keys_SC.dtype) if ctx.needs_input_grad[1] else None
        return grad_q, grad_keys, None
