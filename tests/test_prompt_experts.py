"""Prompt-selected experts (PEER) and neurons (dense FFN, GRIFFIN) against brute-force references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peer_dist.errors import ConfigError
from peer_dist.inference.generate import Sampling, generate
from peer_dist.inference.prompt_experts import PromptSelectedMLP, PromptSelectedPEER, prompt_selection
from peer_dist.model.peer import PEER
from peer_dist.model.transformer import DenseMLP, KVCache
from tests.helpers import small_lm
from tests.references import all_composite_keys


def _prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (n,), generator=gen).tolist() for n in lengths]


def test_a_pool_of_all_experts_and_all_neurons_changes_nothing() -> None:
    model = small_lm("peer")
    prompts, sampling = _prompts((7, 4)), Sampling(max_new_tokens=8, temperature=0)
    plain = generate(model, prompts, sampling, eot_id=-1)
    with prompt_selection(model, experts=256, neurons=1.0) as selection:
        selected = generate(model, prompts, sampling, eot_id=-1, hook=selection)
    assert selected == plain
    assert isinstance(model.blocks[0].ffn, PEER) and isinstance(model.blocks[1].ffn, DenseMLP)  # restored


def _capture_inputs(model: torch.nn.Module) -> tuple[dict[int, list[torch.Tensor]], list]:
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [block.ffn.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, []).append(args[0]))
               for i, block in enumerate(model.blocks)]
    return seen, handles


def _reference_scores(layer: PEER, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, H, N): every composite key's score, brute force (queries normalised as in eval)."""
    q = layer.query_norm(layer.query(x_TD)).view(-1, layer.heads, layer.d_key)
    return torch.einsum("thq,nq->thn", q, all_composite_keys(layer.sub_keys))


@torch.no_grad()
def test_pool_is_the_top_gate_mass_and_decode_is_exact_within_it() -> None:
    """Prompt of 9 tokens, pool of 24 of 256 experts. Reference: gate mass per expert from the
    brute-force top-k over all N keys; a decode step's top-k over all N keys with the others masked."""
    model, pool = small_lm("peer"), 24
    tokens = torch.tensor(_prompts((9,), seed=3))
    with prompt_selection(model, experts=pool) as selection:
        seen, handles = _capture_inputs(model)
        cache = KVCache.for_model(model, 1, 12)
        selection.begin()
        model(tokens, cache)
        selection.after_prefill(torch.ones(1, 9, dtype=torch.bool))
        wrapped: PromptSelectedPEER = model.blocks[0].ffn
        layer = wrapped.layer
        x_prompt = seen[0][0][0]  # (9, D)
        scores = _reference_scores(layer, x_prompt)
        top, ids = scores.topk(layer.topk, dim=-1)
        mass = torch.zeros(layer.num_experts, dtype=torch.float64).index_add_(
            0, ids.flatten(), top.softmax(-1).flatten().double())
        expected_pool = set(mass.argsort(descending=True, stable=True)[:pool].tolist())
        assert set(wrapped.pool_ids_BM[0].tolist()) == expected_pool
        # one decode step: the layer's output against the masked brute force
        model(torch.tensor([[17]]), cache)
        for h in handles:
            h.remove()
        x = seen[0][-1].reshape(1, -1)
        step_scores = _reference_scores(layer, x)
        outside = torch.ones(layer.num_experts, dtype=torch.bool)
        outside[list(expected_pool)] = False
        top, ids = step_scores.masked_fill(outside, float("-inf")).topk(layer.topk, dim=-1)
        z = torch.einsum("d,hkd->hk", x[0], layer.expert_u[ids[0]])
        expected = torch.einsum("hk,hkd->d", top[0].softmax(-1) * F.gelu(z), layer.expert_v[ids[0]])
        torch.testing.assert_close(wrapped(x.view(1, 1, -1)).flatten(), expected, rtol=1e-5, atol=1e-6)
        assert set(ids.flatten().tolist()) <= expected_pool


@torch.no_grad()
def test_griffin_keeps_the_neurons_of_largest_normalised_prompt_activation() -> None:
    model = small_lm("peer")
    mlp: DenseMLP = model.blocks[1].ffn
    wrapped = PromptSelectedMLP(mlp, keep=0.25)
    x_prompt, x_next = torch.randn(1, 6, 32), torch.randn(1, 2, 32)
    wrapped.begin()
    torch.testing.assert_close(wrapped(x_prompt), mlp(x_prompt))  # the prompt itself is exact
    wrapped.after_prefill(torch.ones(1, 6, dtype=torch.bool))
    h = F.gelu(mlp.fc_in(x_prompt[0]))  # (6, F)
    score = (h / h.norm(dim=-1, keepdim=True)).norm(dim=0)
    kept = score.topk(12).indices  # 25 % of 48
    mask = torch.zeros(48)
    mask[kept] = 1
    expected = mlp.fc_out(F.gelu(mlp.fc_in(x_next)) * mask)
    torch.testing.assert_close(wrapped(x_next), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_padding_does_not_vote() -> None:
    """In a left-padded batch every sequence gets the pool it gets alone."""
    model = small_lm("peer")
    prompts, sampling = _prompts((3, 10, 6), seed=5), Sampling(max_new_tokens=5, temperature=0)
    with prompt_selection(model, experts=16) as selection:
        batched = generate(model, prompts, sampling, eot_id=-1, hook=selection)
        pools = [set(row.tolist()) for row in selection.peers[0].pool_ids_BM]
        for prompt, out, pool in zip(prompts, batched, pools):
            assert generate(model, [prompt], sampling, eot_id=-1, hook=selection)[0] == out
            assert set(selection.peers[0].pool_ids_BM[0].tolist()) == pool


def test_bad_sizes_are_config_errors() -> None:
    model = small_lm("peer")
    with pytest.raises(ConfigError, match="between 1 and the layer's 256 experts"):
        with prompt_selection(model, experts=300):
            pass
    with pytest.raises(ConfigError, match="below the layer's top-k 4"):
        with prompt_selection(model, experts=2):
            pass
    with pytest.raises(ConfigError, match=r"fraction in \(0, 1\]"):
        with prompt_selection(model, neurons=1.5):
            pass
    with pytest.raises(ConfigError, match="needs a model with PEER layers"):
        with prompt_selection(small_lm("dense"), experts=16):
            pass
