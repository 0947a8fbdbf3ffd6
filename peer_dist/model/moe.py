"""Coarse-grained mixture of experts: the Switch / GLaM / Mixtral baseline of the PEER paper.

Shape suffixes: T tokens, D d_model, E experts, K topk, F expert hidden width,
L experts held by this process (E / ep_size), S slots (token, expert), P slots in
expert order.

    logits = x W_r                          router, (T, E), computed in fp32
    (l_K, e_K) = top-K of logits            token choice
    g_K = softmax(l_K)                      gates renormalised over the chosen experts (Mixtral)
    y = sum_K g * MLP_e(x)                  dropless: every chosen expert runs, no capacity limit

Auxiliary losses, added to the LM loss by the trainer:

- load balancing (Switch Transformer, eq. 4, generalised to top-K):
  aux = E * sum_e f_e * P_e, with f_e the fraction of the T*K assignments that went
  to expert e and P_e the mean router probability of e over the tokens;
- router z-loss (ST-MoE, eq. 5): z = mean_t logsumexp(logits_t)^2.

Both are functions of batch statistics. ``reduce_stats`` (set by the trainer, like
the PEER query BatchNorm's) sums [counts, prob sums, z sum, token count] over the
data-parallel group with an autograd-aware all-reduce, so data-parallel training
optimises exactly the losses of a single process on the global batch.

Experts live in :class:`MoEExperts` (this process's shard under expert
parallelism; the dispatch in peer_dist.parallel calls :meth:`MoEExperts.compute`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model.expert_ops import ExpertRouting
from peer_dist.model.expert_tables import ExpertSharding, init_rows_


class MoEExperts(nn.Module):
    """The dense-MLP experts this process holds: (L, D, F) input and (L, F, D) output weights."""

    def __init__(self, sharding: ExpertSharding, d_model: int, d_expert: int, mlp: str = "gelu") -> None:
        super().__init__()
        self.sharding, self.mlp = sharding, mlp
        local = sharding.rows_per_rank
        self.w_in = nn.Parameter(torch.empty(local, d_model, d_expert))
        self.w_gate = nn.Parameter(torch.empty(local, d_model, d_expert)) if mlp == "swiglu" else None
        self.w_out = nn.Parameter(torch.empty(local, d_expert, d_model))

    @torch.no_grad()
    def reset_parameters(self, seed: int, std_in: float, std_out: float) -> None:
        """Per-expert draws keyed by global expert id: a shard equals those experts of the full layer."""
        if self.w_in.is_meta:
            return
        ids, num = self.sharding.global_ids(), self.sharding.num_experts
        init_rows_(self.w_in.view(len(ids), -1), ids, num, seed, std_in)
        init_rows_(self.w_out.view(len(ids), -1), ids, num, seed + 1, std_out)
        if self.w_gate is not None:
            init_rows_(self.w_gate.view(len(ids), -1), ids, num, seed + 2, std_in)

    def forward(self, x_TD: Tensor, ids_TK: Tensor, gates_TK: Tensor) -> Tensor:
        """All experts local: y[t] = sum_k gates[t, k] * MLP_{ids[t, k]}(x[t]), (T, D)."""
        if self.sharding.ep_size != 1:
            raise RuntimeError("these experts are a shard: run the layer through the expert-parallel dispatch")
        return self.compute(x_TD, gates_TK.reshape(-1), ExpertRouting.build(ids_TK, self.sharding.num_experts))

    def compute(self, x_RD: Tensor, gates_S: Tensor, routing: ExpertRouting) -> Tensor:
        """Rows grouped by local expert (the routing's sort), one batched MLP per expert, (R, D)."""
        bounds = routing.expert_bounds()  # NOTE: host sync: per-expert segment bounds become slice indices
        rows, outs = [], []
        for e in range(routing.num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if lo == hi:
                continue
            rows_P = routing.row_P[lo:hi]
            h_PF = self._mlp_in(x_RD.index_select(0, rows_P), e)
            outs.append((h_PF @ self.w_out[e]) * gates_S.index_select(0, routing.slot_P[lo:hi]).unsqueeze(1))
            rows.append(rows_P)
        out_RD = x_RD.new_zeros(x_RD.shape)
        if not outs:  # no slot here: keep inputs and weights in the graph so they get (zero) gradients
            return out_RD + x_RD.sum() * 0 + gates_S.sum() * 0 + sum(p.reshape(-1)[:0].sum() for p in self.parameters())
        return out_RD.index_add(0, torch.cat(rows), torch.cat(outs).to(x_RD.dtype))

    def _mlp_in(self, x_PD: Tensor, e: int) -> Tensor:
        if self.w_gate is not None:
            return F.silu(x_PD @ self.w_gate[e]) * (x_PD @ self.w_in[e])
        return F.gelu(x_PD @ self.w_in[e])

    def extra_repr(self) -> str:
        s = self.sharding
        return f"experts={s.rows_per_rank} of {s.num_experts} (ep_rank {s.ep_rank}/{s.ep_size}), mlp={self.mlp}"


class MoE(nn.Module):
    """Token-choice top-K mixture of E dense-MLP experts with Switch and z-loss auxiliaries.

    After each forward ``aux_loss`` holds aux_loss_coef * balance + z_loss_coef * z
    (a scalar tensor in the graph) and ``router_stats`` the detached parts.
    """

    def __init__(self, d_model: int, num_experts: int, topk: int, d_expert: int, mlp: str = "gelu",
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001,
                 sharding: ExpertSharding | None = None) -> None:
        super().__init__()
        if not 1 <= topk <= num_experts:
            raise ConfigError(f"model.moe.topk={topk} must be between 1 and model.moe.num_experts={num_experts}")
        if mlp not in ("gelu", "swiglu"):
            raise ConfigError(f"MoE expert mlp must be 'gelu' or 'swiglu', got {mlp!r}")
        self.num_experts, self.topk = num_experts, topk
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = nn.Linear(d_model, num_experts, bias=False)
        sharding = sharding or ExpertSharding(num_experts)
        self.experts: nn.Module = MoEExperts(sharding, d_model, d_expert, mlp)
        self.reduce_stats: Callable[[Tensor], Tensor] | None = None
        self.aux_loss: Tensor | None = None
        self.router_stats: dict[str, Tensor] = {}
        self.init_seed = 0

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Router and expert inputs N(0, std); expert outputs N(0, out_std) (the residual-scaled std)."""
        nn.init.normal_(self.router.weight, std=std)
        self.init_seed = int(torch.randint(0, 1 << 62, (), device="cpu").item())
        tables = self.experts if isinstance(self.experts, MoEExperts) else self.experts.tables
        tables.reset_parameters(self.init_seed, std, out_std)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        x_TD = x.reshape(-1, x.shape[-1])
        logits_TE = self.router(x_TD).float()
        top_logits_TK, ids_TK = logits_TE.topk(self.topk, dim=-1)
        gates_TK = top_logits_TK.softmax(dim=-1)
        self.aux_loss = self._aux_losses(logits_TE, ids_TK)
        y_TD = self.experts(x_TD, ids_TK, gates_TK.to(x_TD.dtype))
        return y_TD.view(x.shape)

    def _aux_losses(self, logits_TE: Tensor, ids_TK: Tensor) -> Tensor:
        num_experts = self.num_experts
        probs_TE = logits_TE.softmax(dim=-1)
        counts_E = torch.zeros(num_experts, device=logits_TE.device).index_add_(
            0, ids_TK.reshape(-1), torch.ones(ids_TK.numel(), device=logits_TE.device))
        z_sum = torch.logsumexp(logits_TE, dim=-1).pow(2).sum()
        tokens = logits_TE.new_full((1,), float(logits_TE.shape[0]))
        # [assignments per expert, summed probabilities, z sum, tokens] - one tensor for one all-reduce
        stats = torch.cat([counts_E, probs_TE.sum(0), z_sum.reshape(1), tokens])
        if self.reduce_stats is not None:
            stats = self.reduce_stats(stats)
        counts_E, prob_sum_E = stats[:num_experts], stats[num_experts: 2 * num_experts]
        z_sum, tokens = stats[-2], stats[-1].clamp_min(1.0)
        f_E = counts_E / (tokens * self.topk)
        balance = num_experts * (f_E * prob_sum_E / tokens).sum()
        z_loss = z_sum / tokens
        # Detached tensors: read (and synced) only when the trainer logs.
        self.router_stats = {"balance_loss": balance.detach(), "z_loss": z_loss.detach(),
                             "max_load": f_E.max().detach() * num_experts}
        return self.aux_loss_coef * balance + self.z_loss_coef * z_loss

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, topk={self.topk}, aux={self.aux_loss_coef}, z={self.z_loss_coef}"
