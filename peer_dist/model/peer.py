"""PEER: Parameter Efficient Expert Retrieval ("Mixture of A Million Experts", He 2024, arXiv 2407.04153).

Shape suffixes (torchtitan style):
    T  tokens (all leading dims of the input flattened)
    D  d_model             F  query features = H * Q
    H  heads               Q  d_key
    K  topk per head       J  retrieved experts per token = H * K
    N  experts = S * S     S  sub-keys per half (n in the paper)
    C  d_key // 2          2  the two product-key halves

The layer (paper sec. 2, Algorithm 1):
    q_h = norm(W_q x)_h                               one Linear for all heads, then the query norm
    (s_h, I_h) = top-K over i of q_h . k_i           exact, via product keys (product_keys.py)
    g_h = softmax(s_h)                                per head, over the K retrieved scores
    y = sum_h sum_{i in I_h} g_{h,i} * sigma(u_i . x) * v_i
All heads share one expert pool (u, v tables) and one set of product keys.
Expert compute streams table rows and never builds (T, J, D) tensors (expert_ops.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model.expert_ops import (
    DEFAULT_CHUNK_SIZE,
    GATHER_DOT_KERNELS,
    ExpertRouting,
    expert_mix,
    fused_kernel_available,
)
from peer_dist.model.product_keys import product_key_topk

ACTIVATIONS = ("gelu", "relu")
QUERY_NORMS = ("batchnorm", "layernorm", "none")

__all__ = ["PEER", "QueryBatchNorm", "usage_metrics", "ACTIVATIONS", "QUERY_NORMS"]


class QueryBatchNorm(nn.Module):
    """BatchNorm over the last dim (F features), statistics over all other dims.

    Same maths, parameters and buffers as ``nn.BatchNorm1d(F)`` (affine, momentum
    0.1, running var unbiased, eval uses running stats), but the batch statistics
    go through ONE tensor ``[sum_F, sum_sq_F, count]`` (length 2F + 1) that
    ``reduce_stats`` may sum over data-parallel ranks. The trainer sets it to an
    autograd-aware all_reduce; this module never imports torch.distributed.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.reduce_stats: Callable[[Tensor], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """(..., F) -> (..., F)."""
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected (..., {self.num_features}) features, got {tuple(x.shape)}")
        if not self.training:
            return self._normalize(x, self.running_mean, self.running_var)
        mean_F, var_F, count = self._batch_stats(x.reshape(-1, self.num_features))
        self._update_running_stats(mean_F, var_F, count)
        return self._normalize(x, mean_F, var_F)

    def _batch_stats(self, x_TF: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # One-pass (sum, sum_sq, count) is what lets ranks sync with a single
        # all_reduce. var = E[x^2] - E[x]^2 then cancels when |mean| >> std, so
        # the sums accumulate in float64 (without a float64 copy of x).
        x_TF = x_TF if x_TF.dtype in (torch.float32, torch.float64) else x_TF.float()
        sum_F = x_TF.sum(0, dtype=torch.float64)
        sum_sq_F = (x_TF * x_TF).sum(0, dtype=torch.float64)
        count = sum_F.new_full((1,), float(x_TF.shape[0]))
        stats = torch.cat([sum_F, sum_sq_F, count])
        if self.reduce_stats is not None:
            stats = self.reduce_stats(stats)  # sums over data-parallel ranks
        sum_F, sum_sq_F, count = stats.split([self.num_features, self.num_features, 1])
        safe_count = count.clamp_min(1.0)  # a step with no tokens anywhere must not produce NaN
        mean_F = sum_F / safe_count
        var_F = (sum_sq_F / safe_count - mean_F * mean_F).clamp_min(0.0)  # biased, as BatchNorm normalises
        return mean_F, var_F, count

    @torch.no_grad()
    def _update_running_stats(self, mean_F: Tensor, var_F: Tensor, count: Tensor) -> None:
        # Running var is unbiased (n / (n - 1)), like nn.BatchNorm1d; no update without tokens.
        unbiased_F = torch.where(count > 1, var_F * count / (count - 1).clamp_min(1.0), var_F)
        momentum = (count > 0).to(self.running_mean.dtype) * self.momentum
        self.running_mean.lerp_(mean_F.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_F.to(self.running_var.dtype), momentum)
        self.num_batches_tracked.add_(1)

    def _normalize(self, x: Tensor, mean_F: Tensor, var_F: Tensor) -> Tensor:
        # Folded into one (..., F) op, y = x * scale + shift: saves one activation
        # for backward instead of three.
        scale_F = self.weight * torch.rsqrt(var_F + self.eps).to(self.weight.dtype)
        shift_F = self.bias - mean_F.to(self.weight.dtype) * scale_F
        return torch.addcmul(shift_F.to(x.dtype), x, scale_F.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class PEER(nn.Module):
    """A PEER layer: N = n^2 single-neuron experts, h heads, top-k product-key retrieval.

    Args:
        d_model: D, input and output width.
        num_experts: N, a perfect square n * n.
        heads: h query heads sharing one expert pool and one set of product keys.
        topk: k experts per head, 1 <= k <= n.
        d_key: query / key width (even: split into two halves).
        activation: sigma of the experts, "gelu" or "relu".
        query_norm: "batchnorm" (paper default), "layernorm" (per head) or "none".
        chunk_size: (token, expert) pairs per chunk of the chunked gather-dot kernel.
        kernel: gather-dot kernel of the u side and the v-side backward, "auto" |
            "fused" | "chunked" (see expert_ops.gather_dot).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        heads: int = 8,
        topk: int = 16,
        d_key: int = 128,
        activation: str = "gelu",
        query_norm: str = "batchnorm",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        num_sub = _validate_config(d_model, num_experts, heads, topk, d_key, activation, query_norm, chunk_size, kernel)
        self.d_model, self.num_experts, self.num_sub_keys = d_model, num_experts, num_sub
        self.heads, self.topk, self.d_key = heads, topk, d_key
        self.activation, self.chunk_size, self.kernel = activation, chunk_size, kernel
        self.query = nn.Linear(d_model, heads * d_key, bias=False)
        self.query_norm = _make_query_norm(query_norm, heads, d_key)
        self.sub_keys = nn.Parameter(torch.empty(2, num_sub, d_key // 2))
        self.expert_u = nn.Parameter(torch.empty(num_experts, d_model))
        self.expert_v = nn.Parameter(torch.empty(num_experts, d_model))
        # Table 2 metrics; float64 so counts stay exact past 2^24 retrievals.
        self.register_buffer("usage_counts", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("usage_mass", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self._track_usage = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise so that scores, expert pre-activations and the output are O(1).

        - query ~ N(0, 1/D): unit-variance queries for unit-variance x, also
          without a query norm.
        - sub-keys ~ N(0, 1/d_key): each half-score q1 . c has variance 1/2, so a
          composite score has variance 1 and the softmax gates start neither flat
          nor one-hot.
        - u ~ N(0, 1/D): z = u . x ~ N(0, 1) puts sigma in its non-linear range.
        - v ~ N(0, 1/(h k)): the h*k retrieved experts act as the hidden units of
          an FFW of width h*k, and 1/fan_in is that FFW's output init. Then
          Var(y) = E[sigma(z)^2] * sum g^2 / (h k) <= 0.5 / k, since sum g^2 <= h.
        """
        nn.init.normal_(self.query.weight, std=self.d_model**-0.5)
        nn.init.normal_(self.sub_keys, std=self.d_key**-0.5)
        nn.init.normal_(self.expert_u, std=self.d_model**-0.5)
        nn.init.normal_(self.expert_v, std=(self.heads * self.topk) ** -0.5)

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., D) -> (scores, ids), both (..., H, K).

        scores: composite key scores q_h . k_id (differentiable w.r.t. the query
        network, its norm and the sub-keys). ids: int64 global expert ids a*n + b.
        """
        x_TD = self._flatten(x)
        scores_THK, ids_THK = self._retrieve_flat(x_TD)
        out_shape = (*x.shape[:-1], self.heads, self.topk)
        return scores_THK.reshape(out_shape), ids_THK.reshape(out_shape)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> y (..., D): retrieve, gate, expert compute (Algorithm 1)."""
        x_TD = self._flatten(x)
        scores_THK, ids_THK = self._retrieve_flat(x_TD)
        gates_THK = scores_THK.softmax(dim=-1)
        if self._track_usage:
            self._accumulate_usage(ids_THK, gates_THK)
        num_tokens, num_slots = x_TD.shape[0], self.heads * self.topk
        routing = ExpertRouting.build(ids_THK.reshape(num_tokens, num_slots), self.num_experts)
        gates_TJ = gates_THK.reshape(num_tokens, num_slots)
        y_TD = expert_mix(
            x_TD, gates_TJ, routing, self.expert_u, self.expert_v, self.activation, self.kernel, self.chunk_size
        )
        return y_TD.view(x.shape)

    def _flatten(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"PEER expects input (..., d_model={self.d_model}), got {tuple(x.shape)}")
        return x.reshape(-1, self.d_model)

    def _retrieve_flat(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        num_tokens = x_TD.shape[0]
        q_TF = self.query(x_TD)
        if isinstance(self.query_norm, nn.LayerNorm):
            q_THQ = self.query_norm(q_TF.view(num_tokens, self.heads, self.d_key))
        else:
            q_THQ = self.query_norm(q_TF).view(num_tokens, self.heads, self.d_key)
        return product_key_topk(q_THQ, self.sub_keys, self.topk)

    # ---- usage tracking (paper Table 2) -------------------------------------------------

    def track_usage(self, enabled: bool = True) -> None:
        """Accumulate usage_counts / usage_mass in every forward (any mode) while enabled."""
        self._track_usage = bool(enabled)

    def reset_usage(self) -> None:
        """Zero the usage buffers (e.g. before a validation pass)."""
        self._ensure_float64_usage()
        self.usage_counts.zero_()
        self.usage_mass.zero_()

    @torch.no_grad()
    def _accumulate_usage(self, ids_THK: Tensor, gates_THK: Tensor) -> None:
        self._ensure_float64_usage()
        ids_P = ids_THK.reshape(-1)
        self.usage_counts.index_add_(0, ids_P, torch.ones_like(ids_P, dtype=torch.float64))
        self.usage_mass.index_add_(0, ids_P, gates_THK.detach().reshape(-1).to(torch.float64))

    def _ensure_float64_usage(self) -> None:
        # module.to(dtype) / .half() casts every floating buffer; the metrics need float64.
        if self.usage_counts.dtype != torch.float64:
            self.usage_counts = self.usage_counts.to(torch.float64)
            self.usage_mass = self.usage_mass.to(torch.float64)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts} ({self.num_sub_keys}^2), heads={self.heads}, "
            f"topk={self.topk}, d_key={self.d_key}, activation={self.activation}, kernel={self.kernel}"
        )


def usage_metrics(counts: Tensor, mass: Tensor) -> dict[str, float]:
    """Paper Table 2 metrics from (possibly all-reduced) usage buffers, both (N,).

    expert_usage: fraction of experts retrieved at least once.
    unevenness_kl: KL(z || uniform) = log N + sum_i z_i log z_i with z = mass / sum(mass),
    0 log 0 = 0; 0 for perfectly even gate mass, log N when one expert gets it all.
    NaN when no mass was recorded.
    """
    if counts.dim() != 1 or counts.shape != mass.shape:
        raise ValueError(f"counts and mass must both be (N,), got {tuple(counts.shape)} and {tuple(mass.shape)}")
    num_experts = counts.numel()
    counts, mass = counts.to(torch.float64), mass.to(torch.float64)
    usage = (counts > 0).to(torch.float64).mean()
    total = mass.sum()
    z_N = mass / total
    kl = math.log(num_experts) + torch.special.xlogy(z_N, z_N).sum()
    # NOTE: host sync (metrics only, once per evaluation)
    return {"expert_usage": float(usage), "unevenness_kl": float(kl) if float(total) > 0 else float("nan")}


def _make_query_norm(query_norm: str, heads: int, d_key: int) -> nn.Module:
    if query_norm == "batchnorm":
        return QueryBatchNorm(heads * d_key)
    if query_norm == "layernorm":
        # Per head over d_key: heads are separate query networks, and per-head
        # statistics stay local when tensor parallelism shards the heads.
        return nn.LayerNorm(d_key)
    return nn.Identity()


def _validate_config(
    d_model: int,
    num_experts: int,
    heads: int,
    topk: int,
    d_key: int,
    activation: str,
    query_norm: str,
    chunk_size: int,
    kernel: str,
) -> int:
    """Raise ConfigError on a bad argument; return n = sqrt(num_experts)."""
    for name, value in (("d_model", d_model), ("num_experts", num_experts), ("heads", heads)):
        _require_int(name, value, minimum=1)
    _require_int("topk", topk, minimum=1)
    _require_int("d_key", d_key, minimum=2)
    _require_int("chunk_size", chunk_size, minimum=1)
    num_sub = math.isqrt(num_experts)
    if num_sub * num_sub != num_experts:
        raise ConfigError(f"num_experts must be a perfect square n*n (e.g. 65536 = 256^2), got {num_experts}")
    if topk > num_sub:
        raise ConfigError(f"topk must be at most n = sqrt(num_experts) = {num_sub}, got {topk}")
    if d_key % 2:
        raise ConfigError(f"d_key must be even (split into two product-key halves), got {d_key}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if query_norm not in QUERY_NORMS:
        raise ConfigError(f"query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
    if kernel not in GATHER_DOT_KERNELS:
        raise ConfigError(f"kernel must be one of {GATHER_DOT_KERNELS}, got {kernel!r}")
    if kernel == "fused" and not fused_kernel_available():
        raise ConfigError("kernel='fused' needs aten::_embedding_bag_per_sample_weights_backward; use 'chunked'")
    return num_sub


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
