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

import torch
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model.expert_ops import (DEFAULT_CHUNK_SIZE, EXPERT_MIX_KERNELS, fused_kernel_available,
                                        row_grad_of, triton_kernel_problem)
from peer_dist.model.expert_tables import ExpertSharding, ExpertTables
from peer_dist.model.retrieval import (QUERY_NORMS, ProductKeyLayer, QueryBatchNorm, require_int,
                                       usage_metrics, validate_retrieval)

ACTIVATIONS = ("gelu", "relu")

__all__ = ["PEER", "QueryBatchNorm", "usage_metrics", "ACTIVATIONS", "QUERY_NORMS"]


class PEER(ProductKeyLayer):
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
        kernel: expert-compute kernel: "triton" (fused Triton kernels, CUDA; the
            default there when triton is installed), "fused" | "chunked" (the torch
            path and its gather-dot, see expert_ops.gather_dot) or "auto".
        sharding: which expert rows this process holds (default: all N). A shard
            is only usable through the expert-parallel dispatch that
            ``peer_dist.parallel.parallelize_experts`` installs as ``self.experts``.

    The expert tables u, v live in ``self.experts`` (:class:`ExpertTables`,
    parameters ``experts.u`` and ``experts.v``).
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
        sharding: ExpertSharding | None = None,
    ) -> None:
        validate_peer_config(d_model, num_experts, heads, topk, d_key, activation, query_norm, chunk_size, kernel)
        super().__init__(d_model, num_experts, heads, topk, d_key, query_norm, slots_name="num_experts")
        self.num_experts = num_experts
        self.activation, self.chunk_size, self.kernel = activation, chunk_size, kernel
        sharding = sharding or ExpertSharding(num_experts)
        if sharding.num_experts != num_experts:
            raise ConfigError(f"sharding is for {sharding.num_experts} experts, the layer has {num_experts}")
        self.experts: nn.Module = ExpertTables(sharding, d_model, activation, kernel, chunk_size)
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

        Expert rows are drawn per global id from a seed taken from torch's global RNG,
        so a shard of the table holds exactly the rows the full table would.
        """
        nn.init.normal_(self.query.weight, std=self.d_model**-0.5)
        nn.init.normal_(self.sub_keys, std=self.d_key**-0.5)
        self.init_seed = int(torch.randint(0, 1 << 62, (), device="cpu").item())
        std_v = (self.heads * self.topk) ** -0.5
        self.expert_tables.reset_parameters(self.init_seed, std_u=self.d_model**-0.5, std_v=std_v)

    @property
    def expert_tables(self) -> ExpertTables:
        """The u/v tables this process holds (also when wrapped by an expert-parallel dispatch)."""
        experts = self.experts
        return experts if isinstance(experts, ExpertTables) else experts.tables

    @property
    def expert_u(self) -> Tensor:
        return self.expert_tables.u

    @property
    def expert_v(self) -> Tensor:
        return self.expert_tables.v

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> y (..., D): retrieve, gate, expert compute (Algorithm 1)."""
        x_TD = self._flatten(x)
        if torch.is_grad_enabled() and not x_TD.requires_grad and row_grad_of(self.expert_u) is not None:
            # Nothing before this layer trains (train.trainable = "experts"): the expert ops' backward,
            # which writes the tables' row-sparse gradients, runs only for an input inside the graph.
            x_TD = x_TD.detach().requires_grad_()
        scores_THK, ids_THK = self._retrieve_flat(x_TD)
        gates_THK = scores_THK.softmax(dim=-1)
        if self._track_usage:
            self._accumulate_usage(ids_THK, gates_THK)
        num_tokens, num_slots = x_TD.shape[0], self.heads * self.topk
        y_TD = self.experts(x_TD, ids_THK.reshape(num_tokens, num_slots), gates_THK.reshape(num_tokens, num_slots))
        return y_TD.view(x.shape)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts} ({self.num_sub_keys}^2), heads={self.heads}, "
            f"topk={self.topk}, d_key={self.d_key}, activation={self.activation}, kernel={self.kernel}"
        )


def validate_peer_config(
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
    num_sub = validate_retrieval(d_model, num_experts, heads, topk, d_key, query_norm, "num_experts")
    require_int("chunk_size", chunk_size, minimum=1)
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if kernel not in EXPERT_MIX_KERNELS:
        raise ConfigError(f"kernel must be one of {EXPERT_MIX_KERNELS}, got {kernel!r}")
    if kernel == "fused" and not fused_kernel_available():
        raise ConfigError("kernel='fused' needs aten::_embedding_bag_per_sample_weights_backward; use 'chunked'")
    if kernel == "triton" and (problem := triton_kernel_problem()) is not None:
        raise ConfigError(problem)
    return num_sub
