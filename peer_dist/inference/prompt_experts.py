"""Prompt-selected experts for decoding: the prompt decides which rows of the expert tables the
continuation may use (the "flocking" of GRIFFIN, Dong, Chen, Chi 2024, arXiv 2404.01365).

Shape suffixes: B sequences, T tokens per sequence, D d_model, H heads, Q d_key, K topk,
N experts = S * S, M experts kept per sequence (the pool), F dense FFN width, R neurons kept.

PEER layers (:class:`PromptSelectedPEER`):
    prefill   full product-key retrieval; per sequence, the gate mass each expert received
              over the prompt's tokens: mass[b, i] = sum_{t, h} sum_{k: I_thk = i} g_thk
    select    the pool: the M experts of largest mass (ties: lower id), their u and v rows copied
    decode    per head, the exact top-K of q_h . k_i over the pool only:
              q1 . c_a + q2 . c'_b for every pool id a * S + b (the two side score lists cost
              O(S Q), the pool O(M)); softmax over those K, expert compute on the pool rows.
              Decoding reads M rows per sequence instead of a table of N.
Dense FFN blocks (:class:`PromptSelectedMLP`), GRIFFIN's rule (their eq. 4):
    z_t = h_t / ||h_t||  per prompt token (h the FFN's hidden activation, F wide)
    s_f = ||z_{:, f}||   over the prompt's tokens; keep the R neurons of largest s
    decode with those R rows of the input (and gate) weights and columns of the output weights.

Both are training-free and change nothing during the prompt's forward, so the prompt's own
logits are exact; only the continuation is approximated (exact again with M = N, R = F).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model import TransformerLM
from peer_dist.model.expert_ops import ExpertRouting, expert_mix
from peer_dist.model.peer import PEER
from peer_dist.model.transformer import DenseMLP


class PromptSelectedPEER(nn.Module):
    """A PEER layer whose decode retrieves among each sequence's prompt-selected pool of M experts.

    ``pool_size`` 0 keeps full retrieval (the reference), still counting the rows decode reads.
    """

    def __init__(self, layer: PEER, pool_size: int) -> None:
        super().__init__()
        if not 0 <= pool_size <= layer.num_experts:
            raise ConfigError(f"--prompt-experts must be between 1 and the layer's {layer.num_experts} experts, "
                              f"got {pool_size}")
        if pool_size and pool_size < layer.topk:
            raise ConfigError(f"--prompt-experts {pool_size} is below the layer's top-k {layer.topk}")
        self.layer, self.pool_size = layer, pool_size
        self.begin()

    def begin(self) -> None:
        """Forget the last sequence batch: the next forward is a prompt's."""
        self.prefill: list[tuple[Tensor, Tensor]] = []  # (ids, gates) (B, T, H, K) of the prompt
        self.pool_ids_BM: Tensor | None = None
        self.decoding = False
        # Rows read during decode (for `peer-dist bench generate`), on the tables' device: no host sync.
        self.touched_N = torch.zeros(self.layer.num_experts, dtype=torch.bool, device=self.layer.sub_keys.device)

    def forward(self, x_BTD: Tensor) -> Tensor:
        if not self.decoding:
            scores_THK, ids_THK = self.layer._retrieve_flat(x_BTD.reshape(-1, x_BTD.shape[-1]))
            shape = (*x_BTD.shape[:2], self.layer.heads, self.layer.topk)
            self.prefill.append((ids_THK.view(shape), scores_THK.softmax(dim=-1).view(shape)))
            return self._mix(x_BTD, ids_THK, scores_THK.softmax(dim=-1))
        if self.pool_ids_BM is None:  # full retrieval, counting the rows read
            scores_THK, ids_THK = self.layer._retrieve_flat(x_BTD.reshape(-1, x_BTD.shape[-1]))
            self.touched_N[ids_THK.flatten()] = True
            return self._mix(x_BTD, ids_THK, scores_THK.softmax(dim=-1))
        return self._pool_forward(x_BTD)

    def _mix(self, x_BTD: Tensor, ids_THK: Tensor, gates_THK: Tensor) -> Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        slots = self.layer.heads * self.layer.topk
        y_TD = self.layer.experts(x_TD, ids_THK.reshape(-1, slots), gates_THK.reshape(-1, slots))
        return y_TD.view(x_BTD.shape)

    def after_prefill(self, valid_BP: Tensor) -> None:
        """Decode from now on; with a pool size, keep each sequence's M experts of most prompt gate mass."""
        self.decoding = True
        if not self.pool_size:
            return
        ids_BPHK = torch.cat([ids for ids, _ in self.prefill], dim=1)
        gates_BPHK = torch.cat([g for _, g in self.prefill], dim=1) * valid_BP[:, :, None, None]
        batch, num = ids_BPHK.shape[0], self.layer.num_experts
        mass_BN = torch.zeros(batch, num, dtype=torch.float64, device=ids_BPHK.device)
        mass_BN.scatter_add_(1, ids_BPHK.reshape(batch, -1), gates_BPHK.reshape(batch, -1).double())
        # Ties (e.g. experts no prompt token reached, mass 0) go to the lower id: a stable sort.
        self.pool_ids_BM = mass_BN.sort(dim=1, descending=True, stable=True).indices[:, :self.pool_size]
        tables = self.layer.expert_tables
        self.pool_u_BMD, self.pool_v_BMD = tables.u[self.pool_ids_BM], tables.v[self.pool_ids_BM]
        self.prefill = []

    def _pool_forward(self, x_BTD: Tensor) -> Tensor:
        """Exact top-K per head over the pool, then the expert mix over the pool's rows."""
        layer, (batch, steps, d_model) = self.layer, x_BTD.shape
        q_BTHQ = self._queries(x_BTD.reshape(-1, d_model)).view(batch, steps, layer.heads, layer.d_key)
        half, num_sub = layer.d_key // 2, layer.num_sub_keys
        side1_BTHS = q_BTHQ[..., :half] @ layer.sub_keys[0].t()
        side2_BTHS = q_BTHQ[..., half:] @ layer.sub_keys[1].t()
        a_B11M = torch.div(self.pool_ids_BM, num_sub, rounding_mode="floor")[:, None, None, :]
        b_B11M = (self.pool_ids_BM % num_sub)[:, None, None, :]
        shape = (batch, steps, layer.heads, self.pool_size)
        scores_BTHM = side1_BTHS.gather(-1, a_B11M.expand(shape)) + side2_BTHS.gather(-1, b_B11M.expand(shape))
        top_BTHK, pos_BTHK = scores_BTHM.topk(layer.topk, dim=-1)
        self.touched_N[self.pool_ids_BM.gather(1, pos_BTHK.reshape(batch, -1)).flatten()] = True
        # Rows of the flattened pool tables (B * M, D): sequence b's pool starts at b * M.
        rows_BTHK = pos_BTHK + (torch.arange(batch, device=x_BTD.device) * self.pool_size)[:, None, None, None]
        slots = layer.heads * layer.topk
        routing = ExpertRouting.build(rows_BTHK.reshape(-1, slots), batch * self.pool_size)
        y_TD = expert_mix(x_BTD.reshape(-1, d_model), top_BTHK.softmax(dim=-1).reshape(-1), routing,
                          self.pool_u_BMD.reshape(-1, d_model), self.pool_v_BMD.reshape(-1, d_model),
                          layer.activation, layer.kernel, layer.chunk_size)
        return y_TD.view(x_BTD.shape)

    def _queries(self, x_TD: Tensor) -> Tensor:
        """norm(W_q x) as (T, H * Q), as the layer's own retrieval computes it."""
        layer = self.layer
        q_TF = layer.query(x_TD)
        if isinstance(layer.query_norm, nn.LayerNorm):
            return layer.query_norm(q_TF.view(-1, layer.heads, layer.d_key)).flatten(1)
        return layer.query_norm(q_TF)

    def resident_rows(self) -> int:
        """Expert rows (u and v each) a sequence's decoding needs at hand: its pool, or the whole table."""
        return self.layer.num_experts if self.pool_ids_BM is None else self.pool_size


class PromptSelectedMLP(nn.Module):
    """A dense FFN that decodes with each sequence's R neurons of largest prompt activation (GRIFFIN)."""

    def __init__(self, mlp: DenseMLP, keep: float) -> None:
        super().__init__()
        if not 0 < keep <= 1:
            raise ConfigError(f"--prompt-neurons must be a fraction in (0, 1], got {keep}")
        self.mlp, self.keep = mlp, keep
        self.begin()

    def begin(self) -> None:
        self.prefill: list[Tensor] = []  # hidden activations (B, T, F) of the prompt
        self.decoding = False

    def _hidden(self, x_BTD: Tensor) -> Tensor:
        mlp = self.mlp
        if mlp.fc_gate is not None:
            return F.silu(mlp.fc_gate(x_BTD)) * mlp.fc_in(x_BTD)
        return F.gelu(mlp.fc_in(x_BTD))

    def forward(self, x_BTD: Tensor) -> Tensor:
        if not self.decoding:
            h_BTF = self._hidden(x_BTD)
            self.prefill.append(h_BTF)
            return self.mlp.fc_out(h_BTF)
        # Per sequence: x (T, D) @ W_in[kept]^T (D, R) -> act -> @ W_out[:, kept]^T (R, D)
        z_BTR = torch.bmm(x_BTD, self.w_in_BRD.transpose(1, 2))
        if self.w_gate_BRD is not None:
            h_BTR = F.silu(torch.bmm(x_BTD, self.w_gate_BRD.transpose(1, 2))) * z_BTR
        else:
            h_BTR = F.gelu(z_BTR)
        return torch.bmm(h_BTR, self.w_out_BRD)

    def after_prefill(self, valid_BP: Tensor) -> None:
        self.decoding = True
        h_BPF = torch.cat(self.prefill, dim=1).float()
        z_BPF = h_BPF / h_BPF.norm(dim=-1, keepdim=True).clamp_min(1e-12) * valid_BP[:, :, None]
        score_BF = z_BPF.norm(dim=1)
        width = h_BPF.shape[-1]
        kept_BR = score_BF.topk(max(1, round(self.keep * width)), dim=-1).indices
        mlp = self.mlp
        self.w_in_BRD = mlp.fc_in.weight[kept_BR]
        self.w_gate_BRD = None if mlp.fc_gate is None else mlp.fc_gate.weight[kept_BR]
        self.w_out_BRD = mlp.fc_out.weight.t()[kept_BR]  # (B, R, D): the kept columns of W_out
        self.prefill = []


class PromptSelection:
    """The wrappers installed in a model; generate() calls ``begin`` and ``after_prefill``."""

    def __init__(self, peers: list[PromptSelectedPEER], mlps: list[PromptSelectedMLP]) -> None:
        self.peers, self.mlps = peers, mlps

    def begin(self) -> None:
        for m in (*self.peers, *self.mlps):
            m.begin()

    def after_prefill(self, valid_BP: Tensor) -> None:
        for m in (*self.peers, *self.mlps):
            m.after_prefill(valid_BP)

    def decode_rows_read(self) -> int:
        """Distinct expert rows the decode steps read, summed over the PEER layers."""
        return sum(int(p.touched_N.sum()) for p in self.peers)


@contextmanager
def prompt_selection(model: TransformerLM, experts: int = 0, neurons: float = 0.0,
                     track_full: bool = False) -> Iterator[PromptSelection | None]:
    """Install prompt-selected experts (``experts`` = M per PEER layer) and neurons (``neurons`` =
    the kept fraction of every dense FFN) for the duration of the block; None when neither is on.

    ``track_full``: wrap PEER layers with full retrieval anyway, to count the rows decode reads.
    """
    peers = [(b, b.ffn) for b in model.blocks if isinstance(b.ffn, PEER)]
    mlps = [(b, b.ffn) for b in model.blocks if isinstance(b.ffn, DenseMLP)]
    if experts and not peers:
        raise ConfigError("--prompt-experts needs a model with PEER layers (model.ffn = 'peer')")
    if not (experts or neurons or track_full):
        yield None
        return
    wrapped_peers = [PromptSelectedPEER(layer, experts) for _, layer in peers] if experts or track_full else []
    wrapped_mlps = [PromptSelectedMLP(mlp, neurons) for _, mlp in mlps] if neurons else []
    originals = [(b, b.ffn) for b, _ in (peers if wrapped_peers else []) + (mlps if wrapped_mlps else [])]
    for (block, _), wrapper in zip(originals, [*wrapped_peers, *wrapped_mlps]):
        block.ffn = wrapper
    try:
        yield PromptSelection(wrapped_peers, wrapped_mlps)
    finally:
        for block, original in originals:
            block.ffn = original
