"""PKM: product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys").

The PKM baseline of the PEER paper (He 2024, Table 1): the same retrieval as PEER
(product keys, h heads, exact top-k, softmax over the k scores), but each slot is a
value vector read as is, instead of a single-neuron expert sigma(u . x) v.

Shape suffixes (torchtitan style, as in peer.py):
    T  tokens (all leading dims of the input flattened)
    D  d_model             F  query features = H * Q
    H  heads               Q  d_key
    K  topk per head       J  retrieved slots per token = H * K
    N  value slots = S * S S  sub-keys per half (n in the paper)
    C  d_key // 2          2  the two product-key halves

The layer (Lample et al. 2019, eq. 1-3, with h heads as in their sec. 3.2):
    q_h = norm(W_q x)_h                               one Linear for all heads, then the query norm
    (s_h, I_h) = top-K over i of q_h . k_i           exact, via product keys (product_keys.py)
    w_h = softmax(s_h)                                per head, over the K retrieved scores
    y = sum_h sum_{i in I_h} w_{h,i} * value_i
All heads share one value table and one set of product keys. The value read is
``F.embedding_bag(mode="sum", per_sample_weights=w)``: it streams table rows and
never builds a (T, J, D) gathered tensor, in forward or backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model.expert_tables import ExpertSharding, ValueTable
from peer_dist.model.retrieval import ProductKeyLayer, validate_retrieval

__all__ = ["PKM", "validate_pkm_config"]


class PKM(ProductKeyLayer):
    """A product-key memory layer: N = n^2 value slots, h heads, top-k product-key retrieval.

    Args:
        d_model: D, input and output width.
        num_values: N, a perfect square n * n.
        heads: h query heads sharing one value table and one set of product keys.
        topk: k slots per head, 1 <= k <= n.
        d_key: query / key width (even: split into two halves).
        query_norm: "batchnorm" (as in Lample et al. and the PEER paper), "layernorm"
            (per head) or "none". BatchNorm is :class:`~peer_dist.model.peer.QueryBatchNorm`,
            whose ``reduce_stats`` hook the trainer sets for data-parallel sync.

    Public surface as :class:`~peer_dist.model.peer.PEER`: ``retrieve``, ``forward``,
    ``track_usage`` / ``reset_usage`` and the ``usage_counts`` / ``usage_mass``
    buffers (length N) that :func:`~peer_dist.model.peer.usage_metrics` reads.
    """

    def __init__(
        self,
        d_model: int,
        num_values: int,
        heads: int = 8,
        topk: int = 16,
        d_key: int = 128,
        query_norm: str = "batchnorm",
        sharding: ExpertSharding | None = None,
    ) -> None:
        super().__init__(d_model, num_values, heads, topk, d_key, query_norm, slots_name="num_values")
        self.num_values = num_values
        sharding = sharding or ExpertSharding(num_values)
        if sharding.num_experts != num_values:
            raise ConfigError(f"sharding is for {sharding.num_experts} values, the layer has {num_values}")
        # The value rows live in ``self.memory`` (parameter ``memory.weight``): all N, or this
        # process's shard that the expert-parallel dispatch serves (like PEER's experts).
        self.memory: nn.Module = ValueTable(sharding, d_model)
        self.reset_parameters()

    @property
    def value_table(self) -> ValueTable:
        memory = self.memory
        return memory if isinstance(memory, ValueTable) else memory.tables

    @property
    def values(self) -> Tensor:
        """The value rows this process holds, (N or N / ep, D)."""
        return self.value_table.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise so that scores are O(1) and the output starts small, independent of D.

        - query ~ N(0, 1/D) and sub-keys ~ N(0, 1/d_key): exactly PEER's choice
          (unit-variance queries; each composite score q . k has variance 1, so
          the softmax weights start neither flat nor one-hot).
        - values ~ N(0, 1/(h k)): the h*k read slots play the role of the hidden
          units of an FFW of width h*k, and 1/fan_in is that FFW's output init.
          The ids and weights do not depend on the values, so per coordinate
          Var(y) = sum_h sum_k w^2 / (h k), between 1/k^2 (flat weights) and
          1/k (one-hot weights), since sum_k w^2 is in [1/k, 1] per head.
          This matches PEER's v init, so the comparison differs only in the
          layer. (Lample et al. use std D^-1/2, i.e. Var(y) up to h/D, which
          grows with h and shrinks with D.)
        """
        nn.init.normal_(self.query.weight, std=self.d_model**-0.5)
        nn.init.normal_(self.sub_keys, std=self.d_key**-0.5)
        self.init_seed = int(torch.randint(0, 1 << 62, (), device="cpu").item())
        self.value_table.reset_parameters(self.init_seed, std=(self.heads * self.topk) ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> y (..., D): retrieve, softmax per head, weighted value read."""
        x_TD = self._flatten(x)
        scores_THK, ids_THK = self._retrieve_flat(x_TD)
        weights_THK = scores_THK.softmax(dim=-1)
        if self._track_usage:
            self._accumulate_usage(ids_THK, weights_THK)
        num_tokens, num_slots = x_TD.shape[0], self.heads * self.topk
        # One bag per token holding its H*K slots: the sum over heads and slots in one kernel
        # (or, under expert parallelism, the owners' partial sums added up).
        y_TD = self.memory(x_TD, ids_THK.reshape(num_tokens, num_slots), weights_THK.reshape(num_tokens, num_slots))
        return y_TD.to(x.dtype).view(x.shape)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_values={self.num_values} ({self.num_sub_keys}^2), heads={self.heads}, "
            f"topk={self.topk}, d_key={self.d_key}"
        )


def validate_pkm_config(d_model: int, num_values: int, heads: int, topk: int, d_key: int, query_norm: str) -> int:
    """Raise ConfigError on a bad argument (naming it and what is allowed); return n = sqrt(num_values)."""
    return validate_retrieval(d_model, num_values, heads, topk, d_key, query_norm, "num_values")
