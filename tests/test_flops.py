"""FLOP and parameter counts against hand arithmetic, torch's FlopCounterMode (which counts
every aten matmul actually run) and the parameters of the models actually built."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from peer_dist.config import ModelConfig, MoEConfig, PEERConfig, PKMConfig
from peer_dist.errors import ConfigError
from peer_dist.model import build_model
from peer_dist.model.flops import (
    FlopCount,
    active_params,
    ffn_flops_per_token,
    flops_breakdown,
    format_flops_breakdown,
    model_flops_per_token,
    total_params,
)
from peer_dist.model.peer import PEER
from peer_dist.model.pkm import PKM
from peer_dist.model.product_keys import candidate_ranks

# d = 16, L = 2, d_ff = 32, V = 50, T = 10 throughout the hand counts.
VOCAB, SEQ = 50, 10
PEER_SMALL = PEERConfig(num_experts=64, heads=2, topk=4, d_key=8)  # n = 8
PKM_SMALL = PKMConfig(num_values=64, heads=2, topk=4, d_key=8)
M_TOPK4 = 8  # (i+1)(j+1) <= 4: i=0: j=0..3 (4), i=1: j=0,1 (2), i=2: j=0, i=3: j=0 -> 8


def small(**overrides: object) -> ModelConfig:
    fields = dict(d_model=16, n_layers=2, n_heads=2, d_ff=32, ffn="dense", peer=PEER_SMALL, pkm=PKM_SMALL,
                  moe=MoEConfig(num_experts=4, topk=2))
    fields.update(overrides)
    return ModelConfig(**fields)


# ---- hand counts, one per kind ----------------------------------------------------------------


def test_dense_gelu_hand_count() -> None:
    # forward per token:
    #   lm_head           2 * 16 * 50           = 1600
    #   attention.proj    2 layers * 8 * 16^2   = 4096
    #   attention.scores  2 layers * 4 * 10 * 16 = 1280
    #   dense.mlp         2 layers * 4 * 16 * 32 = 4096
    # total forward 11072; training 3 x = 33216 (every term is a plain matmul)
    terms = flops_breakdown(small(), VOCAB, SEQ)
    assert terms == {
        "lm_head": FlopCount(1600, 3200),
        "attention.proj": FlopCount(4096, 8192),
        "attention.scores": FlopCount(1280, 2560),
        "dense.mlp": FlopCount(4096, 8192),
    }
    assert model_flops_per_token(small(), VOCAB, SEQ) == 33216
    assert ffn_flops_per_token(small(), "dense", SEQ) == {"mlp": 2048}  # one block: 4 * 16 * 32


def test_dense_swiglu_hand_count() -> None:
    # SwiGLU: three 16 x 32 matmuls = 6 * 16 * 32 = 3072 per block
    assert ffn_flops_per_token(small(mlp="swiglu"), "dense", SEQ) == {"mlp": 3072}
    # 33216 + 3 * 2 layers * (3072 - 2048)
    assert model_flops_per_token(small(mlp="swiglu"), VOCAB, SEQ) == 33216 + 6 * 1024


def test_peer_hand_count() -> None:
    # d = 16, h = 2, k = 4, d_key = 8, n = 8, M = 8 candidates per head
    assert len(candidate_ranks(4)) == M_TOPK4
    forward = ffn_flops_per_token(small(ffn="peer"), "peer", SEQ)
    assert forward == {
        "query": 2 * 16 * 2 * 8,  # 512: Linear 16 -> h d_key = 16
        "keys": 2 * 2 * 8 * 8,  # 256: h * 2 halves * 2 * n * d_key/2
        "candidates": 2 * 8,  # 16: h * M additions
        "experts": 2 * 4 * 4 * 16,  # 512: h k slots * (u.x 2d + v scale-add 2d)
    }
    terms = flops_breakdown(small(ffn="peer"), VOCAB, SEQ)  # middle block (1) is PEER, block 0 dense
    assert terms["peer.keys"] == FlopCount(256, 4 * 2 * 4 * 8)  # backward: 4 h k d_key = 256 (sparse)
    assert terms["peer.query"] == FlopCount(512, 1024)
    assert terms["peer.candidates"] == FlopCount(16, 32)
    assert terms["peer.experts"] == FlopCount(512, 1024)
    assert terms["dense.mlp"] == FlopCount(2048, 4096)  # only one dense block left
    # training: 33216 - 3 * 2048 (one dense MLP) + 3 * (512 + 16 + 512) + (256 + 256)
    assert model_flops_per_token(small(ffn="peer"), VOCAB, SEQ) == 33216 - 6144 + 3120 + 512


def test_pkm_hand_count() -> None:
    forward = ffn_flops_per_token(small(ffn="pkm"), "pkm", SEQ)
    assert forward == {
        "query": 512,
        "keys": 256,
        "candidates": 16,
        "values": 2 * 4 * 2 * 16,  # 256: h k slots * 2d
    }
    # training: 33216 - 6144 + 3 * (512 + 16 + 256) + (256 forward + 256 sparse backward)
    assert model_flops_per_token(small(ffn="pkm"), VOCAB, SEQ) == 33216 - 6144 + 2352 + 512


def test_moe_hand_count() -> None:
    # E = 4, k = 2, d_expert = 0 -> d_ff = 32, GELU experts
    assert ffn_flops_per_token(small(ffn="moe"), "moe", SEQ) == {
        "router": 2 * 16 * 4,  # 128
        "experts": 2 * 4 * 16 * 32,  # 4096: k * (two 16 x 32 matmuls)
    }
    # d_expert = 24, SwiGLU experts: k * 6 * d * d_e
    cfg = small(ffn="moe", mlp="swiglu", moe=MoEConfig(num_experts=4, topk=2, d_expert=24))
    assert ffn_flops_per_token(cfg, "moe", SEQ) == {"router": 128, "experts": 2 * 6 * 16 * 24}
    # training (GELU): 33216 - 6144 + 3 * (128 + 4096)
    assert model_flops_per_token(small(ffn="moe"), VOCAB, SEQ) == 33216 - 6144 + 12672


def test_paper_scale_retrieval_numbers() -> None:
    # The paper's N = 1024^2, h = 8, k = 16, d_key = 128 at d = 512: M = 50.
    from peer_dist.config import PEERConfig

    cfg = ModelConfig(d_model=512, ffn="peer", peer=PEERConfig(num_experts=1024**2, heads=8, topk=16, d_key=128))
    forward = ffn_flops_per_token(cfg, "peer", 2048)
    assert forward["keys"] == 8 * 2 * 1024 * 128  # 2,097,152: scoring dominates retrieval
    assert forward["candidates"] == 8 * 50
    assert forward["experts"] == 8 * 16 * 4 * 512


# ---- against torch's FlopCounterMode and the built models ---------------------------------------


def measured_matmul_flops_per_token(model: torch.nn.Module) -> float:
    """FLOPs per token of one forward + backward, counted by torch's FlopCounterMode."""
    tokens = torch.randint(0, VOCAB, (3, SEQ))
    with FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    return counter.get_total_flops() / tokens.numel()


def counted_without_scores(terms: dict) -> float:
    """Training FLOPs per token of the terms FlopCounterMode sees (not the CPU attention kernel)."""
    return sum(t.train for name, t in terms.items() if name != "attention.scores")


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("tie", [True, False])
def test_dense_matmuls_equal_flop_counter(mlp: str, tie: bool) -> None:
    # FlopCounterMode counts the aten matmuls (forward and backward) of a real training
    # step; it does not count the CPU attention kernel, so scores are checked separately.
    cfg = small(mlp=mlp, tie_embeddings=tie)
    terms = flops_breakdown(cfg, VOCAB, SEQ)
    assert measured_matmul_flops_per_token(build_model(cfg, VOCAB)) == counted_without_scores(terms)


def test_attention_scores_convention_is_full_t_by_t() -> None:
    # Explicit attention (q k^T, then weights @ v) for one layer: 2 T^2 d + 2 T^2 d FLOPs
    # per sequence, i.e. 4 T d per token, what the breakdown charges per layer.
    d, heads = 16, 2
    q = torch.randn(1, heads, SEQ, d // heads)
    with FlopCounterMode(display=False) as counter:
        weights = (q @ q.transpose(-1, -2)).softmax(-1)
        weights @ q
    per_layer = flops_breakdown(small(), VOCAB, SEQ)["attention.scores"].forward / 2
    assert counter.get_total_flops() / SEQ == per_layer == 4 * SEQ * d


@pytest.mark.parametrize("tie", [True, False])
def test_dense_equals_six_n_plus_attention(tie: bool) -> None:
    # The Kaplan / PaLM rule: 6 x (matmul weights touched per token) + 12 L T d.
    cfg = small(tie_embeddings=tie, n_layers=3)
    model = build_model(cfg, VOCAB)
    block_matmul = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, nn.Linear))
    head = model.embed.weight.numel()  # the head reads V x d weights, tied or not
    expected = 6 * (block_matmul + head) + 12 * cfg.n_layers * SEQ * cfg.d_model
    assert model_flops_per_token(cfg, VOCAB, SEQ) == expected


@pytest.mark.parametrize("layer_cls,kind", [(PEER, "peer"), (PKM, "pkm")])
def test_retrieval_matmuls_equal_flop_counter(layer_cls: type, kind: str) -> None:
    # The layer's dense matmuls are the query Linear and the sub-key scores (forward), and
    # the query Linear's backward; table reads and the sparse sub-key backward go through
    # embedding_bag, which FlopCounterMode does not count.
    cfg = small(ffn=kind)
    sec = cfg.peer if kind == "peer" else cfg.pkm
    size = sec.num_experts if kind == "peer" else sec.num_values
    layer = layer_cls(cfg.d_model, size, heads=sec.heads, topk=sec.topk, d_key=sec.d_key)
    x = torch.randn(13, cfg.d_model, requires_grad=True)
    with FlopCounterMode(display=False) as forward_counter:
        y = layer(x)
    with FlopCounterMode(display=False) as backward_counter:
        y.sum().backward()
    forward = ffn_flops_per_token(cfg, kind, SEQ)
    assert forward_counter.get_total_flops() / 13 == forward["query"] + forward["keys"]
    assert backward_counter.get_total_flops() / 13 == 2 * forward["query"]


# ---- parameter counts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_embeddings=False),
        dict(mlp="swiglu"),
        dict(ffn="peer"),
        dict(ffn="peer", ffn_blocks="all", peer=PEERConfig(num_experts=64, heads=3, topk=4, d_key=8,
                                                           query_norm="layernorm")),
        dict(ffn="peer", ffn_blocks=[0, 2], n_layers=3, peer=PEERConfig(num_experts=64, heads=2, topk=4,
                                                                        d_key=8, query_norm="none")),
        dict(ffn="pkm"),
        dict(ffn="moe"),
    ],
)
def test_total_params_equal_built_model(overrides: dict) -> None:
    cfg = small(**overrides)
    try:
        model = build_model(cfg, VOCAB)
    except ValueError as exc:  # the transformer does not build this kind yet
        if f"unknown ffn kind {cfg.ffn!r}" not in str(exc):
            raise
        pytest.skip(f"build_model does not support ffn={cfg.ffn!r} yet")
    assert total_params(cfg, VOCAB) == sum(p.numel() for p in model.parameters())


def test_pkm_params_equal_dense_remainder_plus_module() -> None:
    # Independent of build_model: the dense model minus one dense MLP, plus a real PKM layer.
    dense, pkm_cfg = small(), small(ffn="pkm")
    layer = PKM(16, 64, heads=2, topk=4, d_key=8)
    mlp = 2 * 16 * 32
    assert total_params(pkm_cfg, VOCAB) == total_params(dense, VOCAB) - mlp + sum(p.numel() for p in layer.parameters())
    # active: the 64 value rows of 16 become h k = 8 rows
    assert active_params(pkm_cfg, VOCAB) == total_params(pkm_cfg, VOCAB) - (64 - 8) * 16


def test_active_params_by_hand() -> None:
    dense_total = total_params(small(), VOCAB)
    assert active_params(small(), VOCAB) == dense_total
    # PEER: 64 experts of (u, v) = 2 * 16 params; a token retrieves h k = 8 of them
    peer = small(ffn="peer")
    assert total_params(peer, VOCAB) - active_params(peer, VOCAB) == (64 - 8) * 2 * 16
    # h k larger than N: at most N experts (heads=20, k=4: 80 slots > 64 experts)
    many = small(ffn="peer", peer=PEERConfig(num_experts=64, heads=20, topk=4, d_key=8))
    assert active_params(many, VOCAB) == total_params(many, VOCAB)
    # MoE: router 16 * 4 + 4 experts of 2 * 16 * 32; active: 2 of them
    moe = small(ffn="moe")
    assert total_params(moe, VOCAB) == dense_total - 1024 + 64 + 4 * 1024
    assert active_params(moe, VOCAB) == dense_total - 1024 + 64 + 2 * 1024


# ---- ffn_blocks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["peer", "pkm", "moe"])
@pytest.mark.parametrize("blocks,num_special", [("none", 0), ("middle", 1), ("all", 4), ([0, 3], 2), ([2], 1)])
def test_ffn_blocks_respected(kind: str, blocks: str | list[int], num_special: int) -> None:
    cfg = small(ffn=kind, ffn_blocks=blocks, n_layers=4)
    dense = small(n_layers=4)
    ffn_train = sum(t.train for name, t in flops_breakdown(small(ffn=kind, ffn_blocks=[0], n_layers=1), VOCAB, SEQ)
                    .items() if name.startswith(f"{kind}."))
    dense_mlp_train = 3 * 4 * 16 * 32
    expected = model_flops_per_token(dense, VOCAB, SEQ) + num_special * (ffn_train - dense_mlp_train)
    assert model_flops_per_token(cfg, VOCAB, SEQ) == expected
    terms = flops_breakdown(cfg, VOCAB, SEQ)
    assert ("dense.mlp" in terms) == (num_special < 4)
    assert any(name.startswith(f"{kind}.") for name in terms) == (num_special > 0)


def test_dense_kind_with_any_blocks_is_all_dense() -> None:
    for blocks in ("none", "middle", "all", [1]):
        assert flops_breakdown(small(ffn_blocks=blocks), VOCAB, SEQ) == flops_breakdown(small(), VOCAB, SEQ)


# ---- errors and printing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,kind,match",
    [
        (small(), "switch", "model.ffn"),
        (small(peer=PEERConfig(num_experts=60)), "peer", "model.peer.*num_experts"),
        (small(pkm=PKMConfig(num_values=64, topk=9)), "pkm", "model.pkm.*topk"),
        (small(moe=MoEConfig(num_experts=4, topk=5)), "moe", "model.moe.topk"),
    ],
)
def test_invalid_settings_raise_config_error(cfg: ModelConfig, kind: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ffn_flops_per_token(cfg, kind, SEQ)


def test_invalid_sizes_raise() -> None:
    with pytest.raises(ConfigError, match="seq_len"):
        model_flops_per_token(small(), VOCAB, 0)
    with pytest.raises(ConfigError, match="vocab_size"):
        total_params(small(), 0)


def test_format_lists_every_term_and_the_total() -> None:
    text = format_flops_breakdown(small(ffn="peer"), VOCAB, SEQ)
    for name in flops_breakdown(small(ffn="peer"), VOCAB, SEQ):
        assert name in text
    total_line = next(line for line in text.splitlines() if line.startswith("total"))
    assert f"{model_flops_per_token(small(ffn='peer'), VOCAB, SEQ):.4g}" in total_line
    assert f"{total_params(small(ffn='peer'), VOCAB):,}" in text


# ---- training with frozen weights (train.trainable, train.lora_rank) ----------------------------


def _config(model: ModelConfig, **train: object):  # noqa: ANN202 (a Config)
    from peer_dist.config import Config, TrainConfig, validate

    cfg = Config(model=model, train=TrainConfig(**train))
    validate(cfg)
    return cfg


@pytest.mark.parametrize(("targets", "mlp"), [(["wq", "wk", "wv", "wo", "fc_in", "fc_out"], "gelu"),
                                              (["fc_out"], "gelu"), (["wv", "fc_gate"], "swiglu")])
def test_lora_training_flops_equal_flop_counter(targets: list[str], mlp: str) -> None:
    """The matmuls autograd actually runs with a frozen base and LoRA adapters: no weight gradient of the
    base, no input gradient below the lowest adapter (with only fc_out adapted, block 0's attention and
    fc_in run forward only). Scores: FlopCounterMode does not see the CPU attention kernel."""
    from peer_dist.model.flops import training_flops_breakdown
    from peer_dist.model.lora import apply_lora

    cfg = _config(small(mlp=mlp), lora_rank=3, lora_targets=targets)
    torch.manual_seed(0)
    model = apply_lora(build_model(cfg.model, VOCAB), cfg.train)
    terms = training_flops_breakdown(cfg, VOCAB, SEQ)
    assert measured_matmul_flops_per_token(model) == counted_without_scores(terms)
    assert terms["lm_head"].backward == 2 * 16 * VOCAB  # dX only: the tied embedding is frozen


def test_training_flops_with_everything_trained_are_model_flops() -> None:
    from peer_dist.model.flops import training_flops_per_token

    for model in (small(), small(ffn="peer", ffn_blocks=[1]), small(ffn="pkm", ffn_blocks=[0]),
                  small(ffn="moe", ffn_blocks="all"), small(mlp="swiglu", add_peer="residual", add_peer_blocks=[0])):
        assert training_flops_per_token(_config(model), VOCAB, SEQ) == model_flops_per_token(model, VOCAB, SEQ)


def test_added_peer_on_a_frozen_dense_model_hand_count() -> None:
    """d = 16, L = 2, d_ff = 32, V = 50, T = 10; residual PEER (h 2, k 4, d_key 8, n 8) in block 1, only it
    trains. Block 0 and block 1's attention and FFN: forward only (nothing below them trains). The added
    layer: query dW; keys dX (into the trained query) and dW; candidates; experts dX of the gate (2 d per
    slot, not of the input: it needs none) and dW of u, v (4 d per slot). Above it only the lm_head: dX."""
    from peer_dist.model.flops import training_flops_per_token

    cfg = _config(small(add_peer="residual", add_peer_blocks=[1]), trainable="added")
    forward = (2 * 16 * VOCAB + 2 * (8 * 16 * 16 + 4 * SEQ * 16 + 4 * 16 * 32)  # dense model forward
               + 2 * 16 * 2 * 8 + 2 * 2 * 8 * 8 + 2 * M_TOPK4 + 4 * 16 * 2 * 4)  # the added layer's forward
    backward = (2 * 16 * 2 * 8  # query dW
                + 2 * 2 * 4 * 8 * 2  # keys: dX into the query, dW of the k sub-key rows
                + 2 * 2 * M_TOPK4  # candidates
                + (2 + 4) * 16 * 2 * 4  # experts: gate dX, u/v dW
                + 2 * 16 * VOCAB)  # lm_head dX
    assert training_flops_per_token(cfg, VOCAB, SEQ) == forward + backward
