"""Decoder-only transformer with a configurable feed-forward kind per block.

Shape suffixes used in this file:
    B  batch            T  sequence length      D  d_model
    H  attention heads  K  head dim (D // H)    F  dense FFN width
    V  vocabulary       C  cache capacity (positions)   S  positions held (cached + new)

Pre-norm blocks (RMSNorm), rotary position embeddings, causal attention through
``torch.nn.functional.scaled_dot_product_attention``, optional tied embeddings.
With a :class:`KVCache` the forward takes the next tokens of sequences whose earlier
keys and values the cache holds (incremental decoding; peer_dist/inference).
The FFN of each block is ``dense`` (GELU MLP or SwiGLU) or ``peer``; which blocks
get the configured kind is ``model.ffn_blocks`` (default: the middle block, as in
the paper). Parallelism is applied from outside (``peer_dist.parallel``): nothing
here knows about process groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peer_dist.config import ModelConfig, resolve_ffn_blocks
from peer_dist.model.expert_tables import ExpertSharding
from peer_dist.model.moe import MoE
from peer_dist.model.peer import PEER
from peer_dist.model.pkm import PKM


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        # Normalise in fp32 so bf16 activations do not lose the mean-square.
        x = x_BTD.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.type_as(x_BTD) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, K/2) for rotary embeddings (Su et al. 2021)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles_TK = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_TK.cos(), angles_TK.sin()


def apply_rope(x_BHTK: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x0, x1) of the head dim by the position angle."""
    x1, x2 = x_BHTK.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.type_as(x_BHTK)


class Attention(nn.Module):
    """Causal multi-head self-attention; separate q/k/v/o projections so tensor
    parallelism can split them column-wise (q, k, v) and row-wise (o)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        """Causal attention over the T new positions, and over the cache's earlier ones when given."""
        B, T, _ = x_BTD.shape
        # The local head count follows the projection width (-1), so a TP-split wq keeps working.
        def heads(proj: nn.Linear) -> Tensor:
            return proj(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)

        q_BHTK, k_BHTK, v_BHTK = heads(self.wq), heads(self.wk), heads(self.wv)
        q_BHTK, k_BHTK = apply_rope(q_BHTK, cos, sin), apply_rope(k_BHTK, cos, sin)
        if cache is None:
            y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=True)
        else:
            k_BHSK, v_BHSK = cache.append(layer, k_BHTK, v_BHTK)
            y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHSK, v_BHSK, attn_mask=cache.mask(T))
        return self.wo(y_BHTK.transpose(1, 2).reshape(B, T, -1))


class KVCache:
    """Keys and values of every block for B sequences, up to ``capacity`` positions.

    Sequences of different lengths are left-padded: sequence b starts at position
    ``pad_B[b]``, and no query attends to a key before that (RoPE scores depend only
    on the distance between positions, so the offset changes nothing else). A padding
    position attends to itself only, which keeps its (unused) outputs finite.
    """

    def __init__(self, n_layers: int, batch: int, heads: int, head_dim: int, capacity: int,
                 pad_B: Tensor | None = None, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (batch, heads, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.capacity, self.length = capacity, 0
        self.pad_B = torch.zeros(batch, dtype=torch.int64, device=device) if pad_B is None else pad_B.to(device)

    @classmethod
    def for_model(cls, model: TransformerLM, batch: int, capacity: int, pad_B: Tensor | None = None) -> KVCache:
        weight = model.embed.weight
        return cls(model.cfg.n_layers, batch, model.cfg.n_heads, model.cfg.d_model // model.cfg.n_heads, capacity,
                   pad_B, weight.device, weight.dtype)

    def append(self, layer: int, k_BHTK: Tensor, v_BHTK: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions' keys and values; return all held so far, (B, H, S, K) each."""
        end = self.length + k_BHTK.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take position {end}")
        self.k[layer][:, :, self.length:end] = k_BHTK
        self.v[layer][:, :, self.length:end] = v_BHTK
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def mask(self, new: int) -> Tensor:
        """(B, 1, T, S) True where query position i may attend to key position j:
        j <= i and j >= pad_b (causal, not padding), or j == i."""
        end = self.length + new
        i_T1 = torch.arange(self.length, end, device=self.pad_B.device).unsqueeze(1)
        j_1S = torch.arange(end, device=self.pad_B.device).unsqueeze(0)
        allowed_BTS = (j_1S <= i_T1) & (j_1S >= self.pad_B.view(-1, 1, 1)) | (j_1S == i_T1)
        return allowed_BTS.unsqueeze(1)

    def advance(self, new: int) -> None:
        self.length += new


class DenseMLP(nn.Module):
    """GELU MLP (D -> F -> D) or SwiGLU (Shazeer 2020: (silu(x W_g) * x W_in) W_out)."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu") -> None:
        super().__init__()
        self.kind = kind
        self.fc_in = nn.Linear(d_model, d_ff, bias=False)
        self.fc_gate = nn.Linear(d_model, d_ff, bias=False) if kind == "swiglu" else None
        self.fc_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        if self.fc_gate is not None:
            return self.fc_out(F.silu(self.fc_gate(x_BTD)) * self.fc_in(x_BTD))
        return self.fc_out(F.gelu(self.fc_in(x_BTD)))


@dataclass(frozen=True)
class ExpertPlacement:
    """Which expert shard this process holds in every expert layer (default: all experts)."""

    ep_size: int = 1
    ep_rank: int = 0
    layout: str = "permuted"

    def sharding(self, num_experts: int, layout: str | None = None) -> ExpertSharding:
        return ExpertSharding(num_experts, self.ep_size, self.ep_rank, layout or self.layout)


class Block(nn.Module):
    """Pre-norm attention and FFN. ``add_peer`` (model.add_peer, for this block):
    "residual" adds ``self.added_peer`` beside the FFN, x + ffn(n(x)) + peer(n(x)) on the
    same normed input; "replace" makes the FFN a PEER layer. Either added layer starts with
    its v table at 0, so its output is exactly 0 until it trains (the residual model then
    computes exactly what the model without it did)."""

    def __init__(self, cfg: ModelConfig, ffn_kind: str, placement: ExpertPlacement, add_peer: str = "none") -> None:
        super().__init__()
        self.ffn_kind = "peer" if add_peer == "replace" else ffn_kind
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ffn_norm = RMSNorm(cfg.d_model)
        self.ffn = build_ffn(cfg, self.ffn_kind, placement)
        self.added_peer = build_ffn(cfg, "peer", placement) if add_peer == "residual" else None
        added = self.ffn if add_peer == "replace" else self.added_peer
        if added is not None:
            added.added = True  # train.trainable = "added" trains only these
            with torch.no_grad():
                added.expert_tables.v.zero_()

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, cache, layer)
        h_BTD = self.ffn_norm(x_BTD)
        if self.added_peer is None:
            return x_BTD + self.ffn(h_BTD)
        return x_BTD + self.ffn(h_BTD) + self.added_peer(h_BTD)


def build_ffn(cfg: ModelConfig, kind: str, placement: ExpertPlacement) -> nn.Module:
    if kind == "dense":
        return DenseMLP(cfg.d_model, cfg.d_ff, cfg.mlp)
    if kind == "peer":
        p = cfg.peer
        return PEER(
            cfg.d_model, p.num_experts, heads=p.heads, topk=p.topk, d_key=p.d_key,
            activation=p.activation, query_norm=p.query_norm, kernel=p.kernel,
            sharding=placement.sharding(p.num_experts),
        )
    if kind == "moe":
        m = cfg.moe
        return MoE(
            cfg.d_model, m.num_experts, m.topk, m.d_expert or cfg.d_ff, cfg.mlp, m.aux_loss_coef, m.z_loss_coef,
            sharding=placement.sharding(m.num_experts),
        )
    if kind == "pkm":
        k = cfg.pkm
        return PKM(cfg.d_model, k.num_values, heads=k.heads, topk=k.topk, d_key=k.d_key, query_norm=k.query_norm,
                   sharding=placement.sharding(k.num_values))
    raise ValueError(f"unknown ffn kind {kind!r}")  # config validation rejects this earlier


class TransformerLM(nn.Module):
    """tokens (B, T) int64 -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, placement: ExpertPlacement | None = None) -> None:
        super().__init__()
        placement = placement or ExpertPlacement()
        self.cfg = cfg
        self.vocab_size = vocab_size
        special = set(resolve_ffn_blocks(cfg.ffn_blocks, cfg.n_layers))
        added = set(resolve_ffn_blocks(cfg.add_peer_blocks, cfg.n_layers)) if cfg.add_peer != "none" else set()
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, cfg.ffn if i in special else "dense", placement, cfg.add_peer if i in added else "none")
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, vocab_size, bias=False)
        self._init_weights()
        self._rope_cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, std) everywhere, residual output projections scaled by
        # 1/sqrt(2 * n_layers) so the residual stream variance does not grow with depth.
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            for linear in (block.attn.wq, block.attn.wk, block.attn.wv):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(block.attn.wo.weight, std=residual_std)
            if isinstance(block.ffn, DenseMLP):
                nn.init.normal_(block.ffn.fc_in.weight, std=std)
                if block.ffn.fc_gate is not None:
                    nn.init.normal_(block.ffn.fc_gate.weight, std=std)
                nn.init.normal_(block.ffn.fc_out.weight, std=residual_std)
            elif isinstance(block.ffn, MoE):
                block.ffn.reset_parameters(std, residual_std)
            # PEER and PKM layers keep their own initialisation (see their modules).

    def _rope(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        cache = self._rope_cache
        if cache is None or cache[0] < seq_len or cache[1] != device:
            head_dim = self.cfg.d_model // self.cfg.n_heads
            cos, sin = rope_tables(max(seq_len, 1), head_dim, self.cfg.rope_theta, device)
            self._rope_cache = cache = (seq_len, device, cos, sin)
        return cache[2][:seq_len], cache[3][:seq_len]

    def forward(self, tokens_BT: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits (B, T, V). With ``cache``: ``tokens_BT`` continue the cached positions."""
        start = 0 if cache is None else cache.length
        cos, sin = self._rope(start + tokens_BT.shape[1], tokens_BT.device)
        cos, sin = cos[start:], sin[start:]
        x_BTD = self.embed(tokens_BT)
        for i, block in enumerate(self.blocks):
            x_BTD = block(x_BTD, cos, sin, cache, i)
        if cache is not None:
            cache.advance(tokens_BT.shape[1])
        x_BTD = self.norm(x_BTD)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x_BTD, weight)

    def peer_layers(self) -> list[tuple[str, PEER]]:
        """(qualified name, module) of every PEER layer, in block order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, PEER)]

    def aux_loss(self) -> Tensor | None:
        """Sum of the auxiliary losses (MoE load balancing + z-loss) of the last forward, or None."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None


def lm_loss(logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
    """Mean next-token cross entropy over all B*T positions (computed in fp32)."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())


def build_model(cfg: ModelConfig, vocab_size: int, placement: ExpertPlacement | None = None) -> TransformerLM:
    """The LM; with ``placement`` every expert layer allocates only this process's expert shard."""
    return TransformerLM(cfg, vocab_size, placement)
