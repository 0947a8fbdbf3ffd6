"""Configuration of a peer_dist language model for Hugging Face transformers (trust_remote_code).

Shipped inside every `peer-dist export --format hf` folder; needs transformers, not peer_dist.
"""

from __future__ import annotations

from typing import Any

try:  # transformers 5 spells it PreTrainedConfig; 4.x PretrainedConfig
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as PreTrainedConfig


class PeerDistConfig(PreTrainedConfig):
    """A decoder-only transformer whose blocks have dense, MoE, PKM or PEER feed-forward layers.

    ``ffn_kinds``: the feed-forward kind of every block ("dense", "moe", "pkm" or "peer");
    ``peer`` / ``moe`` / ``pkm``: those layers' settings, as in the peer_dist config;
    ``share_embeddings``: the output projection is the input embedding (no lm_head weight).
    """

    model_type = "peer_dist"

    def __init__(self, vocab_size: int = 257, hidden_size: int = 128, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, intermediate_size: int = 512, mlp: str = "gelu",
                 ffn_kinds: list[str] | None = None, share_embeddings: bool = True, rope_theta: float = 10000.0,
                 max_position_embeddings: int = 128, peer: dict[str, Any] | None = None,
                 moe: dict[str, Any] | None = None, pkm: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.mlp = mlp
        self.ffn_kinds = list(ffn_kinds or ["dense"] * num_hidden_layers)
        self.share_embeddings = share_embeddings
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.peer, self.moe, self.pkm = dict(peer or {}), dict(moe or {}), dict(pkm or {})
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs.setdefault("tie_word_embeddings", False)  # sharing is done in the model's forward
        super().__init__(**kwargs)
