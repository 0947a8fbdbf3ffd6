"""What PEER and PKM share: h query heads, a query norm, exact product-key top-k, usage tracking.

Shape suffixes (torchtitan style):
    T  tokens (all leading dims of the input flattened)
    D  d_model             F  query features = H * Q
    H  heads               Q  d_key
    K  topk per head       N  slots (experts or values) = S * S
    S  sub-keys per half (n in the papers)

    q_h = norm(W_q x)_h                               one Linear for all heads, then the query norm
    (s_h, I_h) = top-K over i of q_h . k_i           exact, via product keys (product_keys.py)

Usage tracking feeds the PEER paper's Table 2 metrics (:func:`usage_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model.product_keys import product_key_topk

QUERY_NORMS = ("batchnorm", "layernorm", "none")


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
        # Eval mode normalises with each batch's own statistics instead of the running ones
        # (which stay unchanged): `peer-dist eval --batch-stats`, `peer-dist usage --batch-stats`.
        self.eval_batch_stats = False

    def forward(self, x: Tensor) -> Tensor:
        """(..., F) -> (..., F)."""
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected (..., {self.num_features}) features, got {tuple(x.shape)}")
        if not self.training and not self.eval_batch_stats:
            return self._normalize(x, self.running_mean, self.running_var)
        mean_F, var_F, count = self._batch_stats(x.reshape(-1, self.num_features))
        if self.training:
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


@contextmanager
def batch_statistics(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within it, every QueryBatchNorm of ``model`` in eval mode normalises with each batch's own
    statistics (as in training; running statistics untouched). ``enabled=False``: no change."""
    norms = [m for m in model.modules() if isinstance(m, QueryBatchNorm)] if enabled else []
    for m in norms:
        m.eval_batch_stats = True
    try:
        yield
    finally:
        for m in norms:
            m.eval_batch_stats = False


class ProductKeyLayer(nn.Module):
    """Query network + product keys + usage buffers over ``num_slots`` = n^2 slots.

    Subclasses add what a retrieved slot is (PEER: an expert, PKM: a value) and
    their own ``forward``; they call :meth:`_retrieve_flat` and, when tracking,
    :meth:`_accumulate_usage` with the softmax weights.
    """

    def __init__(self, d_model: int, num_slots: int, heads: int, topk: int, d_key: int, query_norm: str,
                 slots_name: str) -> None:
        super().__init__()
        num_sub = validate_retrieval(d_model, num_slots, heads, topk, d_key, query_norm, slots_name)
        self.d_model, self.num_sub_keys = d_model, num_sub
        self.heads, self.topk, self.d_key = heads, topk, d_key
        self.query = nn.Linear(d_model, heads * d_key, bias=False)
        self.query_norm = make_query_norm(query_norm, heads, d_key)
        self.sub_keys = nn.Parameter(torch.empty(2, num_sub, d_key // 2))
        # Table 2 metrics; float64 so counts stay exact past 2^24 retrievals.
        self.register_buffer("usage_counts", torch.zeros(num_slots, dtype=torch.float64), persistent=False)
        self.register_buffer("usage_mass", torch.zeros(num_slots, dtype=torch.float64), persistent=False)
        self._track_usage = False

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., D) -> (scores, ids), both (..., H, K).

        scores: composite key scores q_h . k_id (differentiable w.r.t. the query
        network, its norm and the sub-keys), descending. ids: int64 global slot ids
        a*n + b, never positions in the candidate list.
        """
        x_TD = self._flatten(x)
        scores_THK, ids_THK = self._retrieve_flat(x_TD)
        out_shape = (*x.shape[:-1], self.heads, self.topk)
        return scores_THK.reshape(out_shape), ids_THK.reshape(out_shape)

    def _flatten(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__} expects input (..., d_model={self.d_model}), got {tuple(x.shape)}")
        return x.reshape(-1, self.d_model)

    def _retrieve_flat(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        num_tokens = x_TD.shape[0]
        q_TF = self.query(x_TD)
        if isinstance(self.query_norm, nn.LayerNorm):  # per head, over d_key
            q_THQ = self.query_norm(q_TF.view(num_tokens, self.heads, self.d_key))
        else:  # BatchNorm statistics per feature of all heads, or no norm
            q_THQ = self.query_norm(q_TF).view(num_tokens, self.heads, self.d_key)
        return product_key_topk(q_THQ, self.sub_keys, self.topk)

    # ---- usage tracking (PEER paper Table 2) --------------------------------------------

    def track_usage(self, enabled: bool = True) -> None:
        """Accumulate usage_counts / usage_mass in every forward (any mode) while enabled."""
        self._track_usage = bool(enabled)

    def reset_usage(self) -> None:
        """Zero the usage buffers (e.g. before a validation pass)."""
        self._ensure_float64_usage()
        self.usage_counts.zero_()
        self.usage_mass.zero_()

    @torch.no_grad()
    def _accumulate_usage(self, ids_THK: Tensor, weights_THK: Tensor) -> None:
        # counts: retrievals per slot; mass: summed softmax weight per slot (the z of
        # the unevenness KL after normalisation).
        self._ensure_float64_usage()
        ids_P = ids_THK.reshape(-1)
        self.usage_counts.index_add_(0, ids_P, torch.ones_like(ids_P, dtype=torch.float64))
        self.usage_mass.index_add_(0, ids_P, weights_THK.detach().reshape(-1).to(torch.float64))

    def _ensure_float64_usage(self) -> None:
        # module.to(dtype) / .half() casts every floating buffer; the metrics need float64.
        if self.usage_counts.dtype != torch.float64:
            self.usage_counts = self.usage_counts.to(torch.float64)
            self.usage_mass = self.usage_mass.to(torch.float64)


def usage_metrics(counts: Tensor, mass: Tensor) -> dict[str, float]:
    """Paper Table 2 metrics from (possibly all-reduced) usage buffers, both (N,).

    expert_usage: fraction of experts retrieved at least once.
    unevenness_kl: KL(z || uniform) = log N + sum_i z_i log z_i with z = mass / sum(mass),
    0 log 0 = 0; 0 for perfectly even gate mass, log N when one expert gets it all.
    NaN when no mass was recorded.
    subkey_usage (N = n * n only): the share of the 2 n sub-keys that are part of at least
    one retrieved expert (expert a * n + b uses sub-key a of the first set, b of the second).
    Usage can be at most the product of the two sets' shares; when it is far below that, the
    retrieved pairs (a, b) are what is concentrated, not the sub-keys.
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
    out = {"expert_usage": float(usage), "unevenness_kl": float(kl) if float(total) > 0 else float("nan")}
    n = math.isqrt(num_experts)
    if n * n == num_experts:
        used_nn = (counts > 0).view(n, n)
        out["subkey_usage"] = float(torch.cat([used_nn.any(1), used_nn.any(0)]).to(torch.float64).mean())
    return out


def independent_halves_usage(counts: Tensor) -> float:
    """The expert usage that the same number of retrievals would reach if the two sub-keys of
    each retrieval were drawn independently from their observed marginals: the mean over
    (a, b) of 1 - exp(-R p(a) p'(b)), R = counts.sum(). Against the usage measured, it says how
    much of the unused share comes from correlated sub-key choices (the pairs), the rest from
    the marginals themselves (rarely or never chosen sub-keys). counts: (n * n,) per expert."""
    n = math.isqrt(counts.numel())
    if n * n != counts.numel():
        raise ValueError(f"counts must have n * n entries, got {counts.numel()}")
    counts_nn = counts.to(torch.float64).view(n, n)
    total = counts_nn.sum()
    if float(total) == 0:
        return 0.0
    first_n, second_n = counts_nn.sum(1) / total, counts_nn.sum(0) / total
    return float((-torch.expm1(-total * first_n[:, None] * second_n[None, :])).mean())


def make_query_norm(query_norm: str, heads: int, d_key: int) -> nn.Module:
    if query_norm == "batchnorm":
        return QueryBatchNorm(heads * d_key)
    if query_norm == "layernorm":
        # Per head over d_key: heads are separate query networks, and per-head
        # statistics stay local when tensor parallelism shards the heads.
        return nn.LayerNorm(d_key)
    return nn.Identity()


def validate_retrieval(d_model: int, num_slots: int, heads: int, topk: int, d_key: int, query_norm: str,
                       slots_name: str) -> int:
    """Raise ConfigError on a bad argument (naming it and what is allowed); return n = sqrt(num_slots)."""
    for name, value in (("d_model", d_model), (slots_name, num_slots), ("heads", heads), ("topk", topk)):
        require_int(name, value, minimum=1)
    require_int("d_key", d_key, minimum=2)
    num_sub = math.isqrt(num_slots)
    if num_sub * num_sub != num_slots:
        raise ConfigError(f"{slots_name} must be a perfect square n*n (e.g. 65536 = 256^2), got {num_slots}")
    if topk > num_sub:
        raise ConfigError(f"topk must be at most n = sqrt({slots_name}) = {num_sub}, got {topk}")
    if d_key % 2:
        raise ConfigError(f"d_key must be even (split into two product-key halves), got {d_key}")
    if query_norm not in QUERY_NORMS:
        raise ConfigError(f"query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
    return num_sub


def require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
