"""A peer_dist language model for Hugging Face transformers (trust_remote_code).

Shipped inside every `peer-dist export --format hf` folder and written for it: it needs torch
and transformers, not peer_dist. Parameter names are those of peer_dist's own model, so the
exported weights load as they are. Inference only (eval-mode maths: query BatchNorms use
their running statistics; no auxiliary losses).

Shape suffixes: B batch, T new positions, S positions held (cache + new), D hidden size,
H attention heads (or retrieval heads), K head dim (or top-k), V vocabulary, N experts / slots.

Feed-forward kinds per block (``config.ffn_kinds``):
    dense  GELU MLP or SwiGLU
    moe    router top-k over E dense-MLP experts, softmax over the chosen logits
    pkm    product-key memory: top-k slots per head, softmax weights, value rows summed
    peer   PEER (He 2024): top-k single-neuron experts per head, g * act(u . x) * v summed
Retrieval (pkm, peer) is the exact product-key top-k: the top-k of each half's sub-key
scores, then the top-k of the k x k sums (every member of the true top-k is among them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_peer_dist import PeerDistConfig

# transformers renamed the cache argument and output field (past_key_values -> cache) within 5.x.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rotate(x_BHTK: Tensor, positions_BT: Tensor, theta: float) -> Tensor:
    """Rotary embedding: each consecutive pair (x0, x1) of the head dim turned by position * freq."""
    head_dim = x_BHTK.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=x_BHTK.device, dtype=torch.float32) / head_dim))
    angles = positions_BT.float()[:, None, :, None] * inv_freq  # (B, 1, T, K/2)
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = x_BHTK.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x_BHTK)


class Attention(nn.Module):
    def __init__(self, config: PeerDistConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads, self.head_dim, self.theta, self.layer_idx = (config.num_attention_heads,
                                                                 d // config.num_attention_heads,
                                                                 config.rope_theta, layer_idx)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x_BTD: Tensor, positions_BT: Tensor, mask_B1TS: Tensor, cache: Any) -> Tensor:
        B, T, _ = x_BTD.shape

        def split(proj: nn.Linear) -> Tensor:
            return proj(x_BTD).view(B, T, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.wq), split(self.wk), split(self.wv)
        q, k = rotate(q, positions_BT, self.theta), rotate(k, positions_BT, self.theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TS)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class DenseMLP(nn.Module):
    def __init__(self, d: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d, hidden, bias=False)
        self.fc_gate = nn.Linear(d, hidden, bias=False) if kind == "swiglu" else None
        self.fc_out = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.fc_gate is not None:
            return self.fc_out(F.silu(self.fc_gate(x)) * self.fc_in(x))
        return self.fc_out(F.gelu(self.fc_in(x)))


class QueryBatchNorm(nn.Module):
    """BatchNorm over the last dim with running statistics (inference)."""

    def __init__(self, features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps) * self.weight + self.bias


class ProductKeys(nn.Module):
    """Queries (one Linear for all heads, then the norm) and exact product-key top-k."""

    def __init__(self, d: int, slots: int, settings: dict[str, Any]) -> None:
        super().__init__()
        self.heads, self.topk, self.d_key = settings["heads"], settings["topk"], settings["d_key"]
        self.num_sub = int(round(slots ** 0.5))
        self.query = nn.Linear(d, self.heads * self.d_key, bias=False)
        norm = settings.get("query_norm", "batchnorm")
        self.per_head_norm = norm == "layernorm"
        self.query_norm = (QueryBatchNorm(self.heads * self.d_key) if norm == "batchnorm"
                           else nn.LayerNorm(self.d_key) if norm == "layernorm" else nn.Identity())
        self.sub_keys = nn.Parameter(torch.zeros(2, self.num_sub, self.d_key // 2))

    def retrieve(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """(softmax weights, ids), both (T, H, K)."""
        q = self.query(x_TD)
        if self.per_head_norm:
            q = self.query_norm(q.view(-1, self.heads, self.d_key))
        else:
            q = self.query_norm(q).view(-1, self.heads, self.d_key)
        half = self.d_key // 2
        s1, i1 = (q[..., :half] @ self.sub_keys[0].t()).topk(self.topk, dim=-1)  # (T, H, K)
        s2, i2 = (q[..., half:] @ self.sub_keys[1].t()).topk(self.topk, dim=-1)
        grid = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # (T, H, K*K)
        scores, pos = grid.topk(self.topk, dim=-1)
        ids = i1.gather(-1, pos // self.topk) * self.num_sub + i2.gather(-1, pos % self.topk)
        return scores.softmax(dim=-1), ids


class ExpertTables(nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(n, d))
        self.v = nn.Parameter(torch.zeros(n, d))


class PEER(ProductKeys):
    def __init__(self, d: int, settings: dict[str, Any]) -> None:
        super().__init__(d, settings["num_experts"], settings)
        self.activation = settings.get("activation", "gelu")
        self.experts = ExpertTables(settings["num_experts"], d)

    def forward(self, x: Tensor) -> Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        gates, ids = self.retrieve(x_TD)  # (T, H, K)
        z = torch.einsum("td,thkd->thk", x_TD, self.experts.u[ids])
        act = F.gelu(z) if self.activation == "gelu" else F.relu(z)
        return torch.einsum("thk,thkd->td", gates * act, self.experts.v[ids]).view(x.shape)


class ValueTable(nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, d))


class PKM(ProductKeys):
    def __init__(self, d: int, settings: dict[str, Any]) -> None:
        super().__init__(d, settings["num_values"], settings)
        self.memory = ValueTable(settings["num_values"], d)

    def forward(self, x: Tensor) -> Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        weights, ids = self.retrieve(x_TD)
        return torch.einsum("thk,thkd->td", weights, self.memory.weight[ids]).to(x.dtype).view(x.shape)


class MoEExperts(nn.Module):
    def __init__(self, n: int, d: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.zeros(n, d, hidden))
        self.w_gate = nn.Parameter(torch.zeros(n, d, hidden)) if kind == "swiglu" else None
        self.w_out = nn.Parameter(torch.zeros(n, hidden, d))


class MoE(nn.Module):
    def __init__(self, d: int, hidden: int, kind: str, settings: dict[str, Any]) -> None:
        super().__init__()
        self.topk = settings["topk"]
        self.router = nn.Linear(d, settings["num_experts"], bias=False)
        self.experts = MoEExperts(settings["num_experts"], d, settings.get("d_expert") or hidden, kind)

    def forward(self, x: Tensor) -> Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        top_logits, ids = self.router(x_TD).float().topk(self.topk, dim=-1)
        gates = top_logits.softmax(dim=-1).to(x_TD.dtype)  # (T, K)
        y = torch.zeros_like(x_TD)
        e = self.experts
        for expert in range(e.w_in.shape[0]):
            rows, slot = (ids == expert).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            h = x_TD[rows] @ e.w_in[expert]
            h = F.silu(x_TD[rows] @ e.w_gate[expert]) * h if e.w_gate is not None else F.gelu(h)
            y.index_add_(0, rows, (h @ e.w_out[expert]) * gates[rows, slot, None])
        return y.view(x.shape)


class Block(nn.Module):
    def __init__(self, config: PeerDistConfig, layer_idx: int) -> None:
        super().__init__()
        d, kind = config.hidden_size, config.ffn_kinds[layer_idx]
        self.attn_norm = RMSNorm(d)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(d)
        if kind == "peer":
            self.ffn = PEER(d, config.peer)
        elif kind == "pkm":
            self.ffn = PKM(d, config.pkm)
        elif kind == "moe":
            self.ffn = MoE(d, config.intermediate_size, config.mlp, config.moe)
        else:
            self.ffn = DenseMLP(d, config.intermediate_size, config.mlp)

    def forward(self, x: Tensor, positions_BT: Tensor, mask_B1TS: Tensor, cache: Any) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions_BT, mask_B1TS, cache)
        return x + self.ffn(self.ffn_norm(x))


class PeerDistForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PeerDistConfig
    base_model_prefix = "peer_dist"
    _no_split_modules = ["Block"]
    _supports_cache_class = True

    def __init__(self, config: PeerDistConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size)
        self.lm_head = None if config.share_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                       bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the export

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Any = None, past_key_values: Any = None, use_cache: bool | None = None,
                labels: Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch, new = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + new, device=device).expand(batch, new)
        mask = self._mask(attention_mask, batch, past, new, device)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, position_ids, mask, cache if use_cache else None)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = F.linear(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

    @staticmethod
    def _mask(attention_mask: Tensor | None, batch: int, past: int, new: int, device: torch.device) -> Tensor:
        """(B, 1, T, S) True where query i may attend to key j: j <= i and key j is not padding
        (or j == i, so a padding query stays finite)."""
        i = torch.arange(past, past + new, device=device)[:, None]
        j = torch.arange(past + new, device=device)[None, :]
        valid = (torch.ones(batch, past + new, dtype=torch.bool, device=device) if attention_mask is None
                 else attention_mask[:, -(past + new):].bool())
        return (((j <= i) & valid[:, None, :]) | (j == i)).unsqueeze(1)
