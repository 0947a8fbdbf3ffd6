"""PEER layer against independent references: brute force over all N keys, a float64
Algorithm 1 that materialises everything, nn.BatchNorm1d, hand-computed metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model.expert_ops import ExpertRouting, expert_mix, gather_dot, segment_sum
from peer_dist.model.peer import PEER, QueryBatchNorm, usage_metrics
from peer_dist.model.product_keys import candidate_ranks, product_key_topk
from tests.references import (all_composite_keys, LargestTensor, compare_with_reference, plant_slot, reference_peer,
                              reference_retrieval)

SMALL = dict(d_model=16, num_experts=64, heads=2, topk=4, d_key=8)


# ---- independent references ------------------------------------------------------------------


def detached_params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}


# ---- product keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,topk", [(8, 1), (8, 4), (8, 8), (16, 16), (32, 5)])
def test_product_key_topk_equals_brute_force(seed: int, n: int, topk: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(7, 3, 10, generator=g, dtype=torch.float64)
    sub_keys = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    scores, ids = product_key_topk(q, sub_keys, topk)
    brute_scores, brute_ids = torch.einsum("thq,nq->thn", q, all_composite_keys(sub_keys)).topk(topk, dim=-1)
    assert ids.dtype == torch.int64 and ids.shape == (7, 3, topk)
    for t in range(7):
        for h in range(3):
            assert set(ids[t, h].tolist()) == set(brute_ids[t, h].tolist())
    torch.testing.assert_close(scores.sort(-1).values, brute_scores.sort(-1).values, rtol=1e-12, atol=1e-12)
    # scores are those of the returned ids, recomputed from the keys
    recomputed = torch.einsum("thq,thkq->thk", q, all_composite_keys(sub_keys)[ids])
    torch.testing.assert_close(scores, recomputed, rtol=1e-12, atol=1e-12)


def test_candidate_ranks_are_the_pairs_that_can_win() -> None:
    assert len(candidate_ranks(16)) == 50
    assert all((i + 1) * (j + 1) <= 16 for i, j in candidate_ranks(16))
    assert candidate_ranks(1) == [(0, 0)]


def test_product_key_topk_with_adversarial_sides() -> None:
    # Both halves rank every key identically: the winners are a staircase, the case the
    # (i+1)(j+1) <= K candidate bound is tight for.
    n, topk = 16, 16
    sub_keys = torch.zeros(2, n, 1, dtype=torch.float64)
    sub_keys[0, :, 0] = torch.linspace(1.0, 0.0, n, dtype=torch.float64) ** 3
    sub_keys[1, :, 0] = torch.linspace(1.0, 0.0, n, dtype=torch.float64) ** 0.5
    q = torch.ones(1, 1, 2, dtype=torch.float64)
    scores, ids = product_key_topk(q, sub_keys, topk)
    brute_scores, brute_ids = torch.einsum("thq,nq->thn", q, all_composite_keys(sub_keys)).topk(topk, dim=-1)
    assert set(ids.flatten().tolist()) == set(brute_ids.flatten().tolist())


# ---- the whole layer against Algorithm 1 --------------------------------------------------------


def _compare_with_reference(model: PEER, cfg: dict, x: Tensor, rtol: float, atol: float) -> None:
    compare_with_reference(model, reference_peer, cfg, x, rtol, atol)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("kernel", ["fused", "chunked"])
def test_matches_algorithm1_float64(seed: int, query_norm: str, activation: str, kernel: str) -> None:
    torch.manual_seed(seed)
    cfg = dict(SMALL, query_norm=query_norm, activation=activation)
    model = PEER(**cfg, kernel=kernel, chunk_size=7).double()
    with torch.no_grad():  # non-trivial affine norm parameters
        for name, param in model.query_norm.named_parameters():
            param.add_(0.3 * torch.randn_like(param))
    x = torch.randn(3, 5, SMALL["d_model"], dtype=torch.float64)
    _compare_with_reference(model, cfg, x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
def test_float32_matches_float64_reference(query_norm: str) -> None:
    torch.manual_seed(5)
    cfg = dict(SMALL, query_norm=query_norm, activation="gelu")
    model = PEER(**cfg)
    x = torch.randn(4, 6, SMALL["d_model"])
    _compare_with_reference(model, cfg, x, rtol=1e-4, atol=1e-5)


def test_shapes_and_leading_dims() -> None:
    model = PEER(**SMALL)
    x = torch.randn(2, 3, 5, SMALL["d_model"])
    scores, ids = model.retrieve(x)
    assert scores.shape == ids.shape == (2, 3, 5, SMALL["heads"], SMALL["topk"])
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < SMALL["num_experts"]
    assert model(x).shape == x.shape
    with pytest.raises(ValueError, match="d_model=16"):
        model(torch.randn(4, 15))


def test_empty_input() -> None:
    model = PEER(**SMALL)
    y = model(torch.randn(0, SMALL["d_model"], requires_grad=True))
    assert y.shape == (0, SMALL["d_model"])
    assert torch.equal(model.query_norm.running_mean, torch.zeros_like(model.query_norm.running_mean))


# ---- ids are global; heads share one pool -------------------------------------------------------


def test_planted_expert_is_retrieved_by_global_id() -> None:
    d_model, n, d_key = 16, 8, 8
    model = PEER(d_model, n * n, heads=1, topk=3, d_key=d_key, query_norm="none")
    a_star, b_star = 5, 3  # global id 43: larger than any candidate-list position (< 9)
    planted = a_star * n + b_star
    x, q_target = plant_slot(model, a_star, b_star)
    with torch.no_grad():
        model.expert_v[:, d_model - 1] = 0.0  # only the planted expert writes the last coordinate
        model.expert_v[planted] = 0.0
        model.expert_v[planted, d_model - 1] = 10.0
        model.expert_u[planted] = x[0]  # u . x = 1, so sigma > 0
    scores, ids = model.retrieve(x)
    assert planted in ids[0, 0].tolist()
    assert int(ids[0, 0, scores[0, 0].argmax()]) == planted
    y = model(x)
    gate = scores[0, 0].softmax(-1)[ids[0, 0] == planted]
    torch.testing.assert_close(y[0, d_model - 1], (gate * F.gelu(torch.tensor(1.0)) * 10.0).squeeze())


@pytest.mark.parametrize("query_norm", ["none", "batchnorm"])
def test_heads_share_keys_and_tables(query_norm: str) -> None:
    torch.manual_seed(0)
    two = PEER(**dict(SMALL, heads=2, query_norm=query_norm))
    one = PEER(**dict(SMALL, heads=1, query_norm=query_norm))
    d_key = SMALL["d_key"]
    with torch.no_grad():
        two.query.weight[d_key:] = two.query.weight[:d_key]  # head 1 := head 0
        one.query.weight.copy_(two.query.weight[:d_key])
        for name in ("sub_keys", "experts.u", "experts.v"):
            one.get_parameter(name).copy_(two.get_parameter(name))
    x = torch.randn(10, SMALL["d_model"])
    _, ids = two.retrieve(x)
    assert torch.equal(ids[:, 0], ids[:, 1])
    torch.testing.assert_close(two(x), 2 * one(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query_norm,norm_params", [("batchnorm", 2 * 3 * 8), ("layernorm", 2 * 8), ("none", 0)])
def test_parameter_count(query_norm: str, norm_params: int) -> None:
    d, n, h, d_key = 16, 8, 3, 8
    model = PEER(d, n * n, heads=h, topk=4, d_key=d_key, query_norm=query_norm)
    expected = d * h * d_key + norm_params + 2 * n * (d_key // 2) + 2 * n * n * d
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.sub_keys.shape == (2, n, d_key // 2)
    assert model.expert_u.shape == model.expert_v.shape == (n * n, d)


# ---- streaming: nothing of size (T, h*k, D) ------------------------------------------------------


@pytest.mark.parametrize("kernel", ["fused", "chunked"])
def test_no_gathered_tensor_in_forward_or_backward(kernel: str) -> None:
    tokens, heads, topk, d_model = 64, 4, 8, 64
    cfg = dict(d_model=d_model, num_experts=256, heads=heads, topk=topk, d_key=16, activation="gelu")
    gathered = tokens * heads * topk * d_model  # 131072; the tables are 16384
    x = torch.randn(tokens, d_model, requires_grad=True)

    model = PEER(**cfg, query_norm="batchnorm", kernel=kernel, chunk_size=256)
    with LargestTensor() as ours:
        model(x).sum().backward()
    assert ours.largest < gathered // 4

    # the check has teeth: the materialising reference trips it
    with LargestTensor() as naive:
        reference_peer(x, detached_params(model), dict(cfg, query_norm="batchnorm")).sum().backward()
    assert naive.largest >= gathered


def test_gather_dot_kernels_and_segment_sum() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(9, 6, generator=g, dtype=torch.float64)
    table = torch.randn(20, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 20, (9, 5), generator=g)
    weights = torch.randn(9, 5, generator=g, dtype=torch.float64)
    routing = ExpertRouting.build(ids, 20)
    expected = torch.einsum("td,tjd->tj", rows, table[ids])
    for kernel, chunk in [("fused", 1), ("chunked", 1), ("chunked", 4), ("chunked", 1000)]:
        torch.testing.assert_close(gather_dot(rows, table, routing, kernel, chunk), expected.reshape(-1))
    seg = torch.zeros(20, 6, dtype=torch.float64).index_add_(
        0, ids.flatten(), (weights[..., None] * rows[:, None, :]).reshape(-1, 6)
    )
    torch.testing.assert_close(segment_sum(rows, weights, routing, torch.float64), seg)
    # bf16 tables: accumulated in fp32, cast once
    seg_bf16 = segment_sum(rows.bfloat16(), weights.bfloat16(), routing, torch.bfloat16)
    assert seg_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(seg_bf16.double(), seg, rtol=3e-2, atol=5e-2)


@pytest.mark.parametrize("kernel", ["fused", "chunked"])
def test_ragged_expert_mix_matches_float64_loop(kernel: str) -> None:
    """Rows with different numbers of experts (as on an expert-parallel owner), empty rows included."""
    g = torch.Generator().manual_seed(1)
    num_rows, d, n_exp = 7, 5, 11
    counts = [3, 0, 1, 5, 0, 2, 4]
    row_S = torch.repeat_interleave(torch.arange(num_rows), torch.tensor(counts))
    ids_S = torch.randint(0, n_exp, (len(row_S),), generator=g)
    x = torch.randn(num_rows, d, generator=g, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(len(row_S), generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(n_exp, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n_exp, d, generator=g, dtype=torch.float64, requires_grad=True)
    routing = ExpertRouting.build_ragged(ids_S, row_S, num_rows, n_exp)
    ours = expert_mix(x, gates, routing, u, v, "gelu", kernel, chunk_size=3)
    ref = torch.zeros(num_rows, d, dtype=torch.float64)
    for s_, (t, e) in enumerate(zip(row_S.tolist(), ids_S.tolist())):
        ref = ref.index_add(0, torch.tensor([t]), (gates[s_] * F.gelu(u[e] @ x[t]) * v[e])[None])
    grad_y = torch.randn(num_rows, d, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(ours, (x, gates, u, v), grad_y)
    want = torch.autograd.grad(ref, (x, gates, u, v), grad_y)
    torch.testing.assert_close(ours, ref)
    assert torch.all(ours[[1, 4]] == 0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- QueryBatchNorm --------------------------------------------------------------------------------


def test_query_batchnorm_equals_batchnorm1d() -> None:
    torch.manual_seed(0)
    ours, ref = QueryBatchNorm(6).double(), nn.BatchNorm1d(6).double()
    with torch.no_grad():
        for module in (ours, ref):
            module.weight.copy_(torch.linspace(0.5, 2.0, 6))
            module.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    for step in range(3):
        x = (3.0 + 2.0 * torch.randn(4, 5, 6, dtype=torch.float64)).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = ours(x), ref(x_ref.view(-1, 6)).view(4, 5, 6)
        grad = torch.randn_like(y)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-12, atol=1e-12)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(ref, name).grad, rtol=1e-10, atol=1e-12)
    ours.eval(), ref.eval()
    x = torch.randn(7, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    ours.load_state_dict(ref.state_dict())  # same state dict layout


def test_query_batchnorm_with_two_simulated_ranks_equals_full_batch() -> None:
    torch.manual_seed(1)
    x = 1.5 + torch.randn(12, 5, dtype=torch.float64)
    x_a, x_b = x[:7].clone().requires_grad_(), x[7:].clone().requires_grad_()  # uneven split
    rank_a, rank_b = QueryBatchNorm(5).double(), QueryBatchNorm(5).double()

    def local_stats(part: Tensor) -> Tensor:
        # the stats protocol: [sum over tokens, sum of squares, token count]
        return torch.cat([part.sum(0), (part * part).sum(0), part.new_full((1,), float(part.shape[0]))])

    # An autograd-aware all_reduce(SUM): each rank adds the other's (graph-connected) stats.
    rank_a.reduce_stats = lambda stats: stats + local_stats(x_b)
    rank_b.reduce_stats = lambda stats: stats + local_stats(x_a)
    y = torch.cat([rank_a(x_a), rank_b(x_b)])
    full, x_full = nn.BatchNorm1d(5).double(), x.clone().requires_grad_()
    y_full = full(x_full)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_full.backward(grad)

    torch.testing.assert_close(y, y_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([x_a.grad, x_b.grad]), x_full.grad, rtol=1e-10, atol=1e-12)
    for name in ("weight", "bias"):  # data parallel sums the ranks' parameter grads
        summed = getattr(rank_a, name).grad + getattr(rank_b, name).grad
        torch.testing.assert_close(summed, getattr(full, name).grad, rtol=1e-10, atol=1e-12)
    for rank in (rank_a, rank_b):
        torch.testing.assert_close(rank.running_mean, full.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rank.running_var, full.running_var, rtol=1e-12, atol=1e-12)


def test_peer_batchnorm_uses_reduce_stats_hook() -> None:
    model = PEER(**SMALL)
    calls = []
    model.query_norm.reduce_stats = lambda stats: calls.append(stats.shape) or stats
    model(torch.randn(5, SMALL["d_model"]))
    assert calls == [torch.Size([2 * SMALL["heads"] * SMALL["d_key"] + 1])]
    model.eval()
    model(torch.randn(5, SMALL["d_model"]))
    assert len(calls) == 1  # eval uses running stats, no reduction


# ---- usage metrics (paper Table 2) -------------------------------------------------------------------


def test_usage_metrics_hand_computed() -> None:
    n = 4  # 2 x 2 sub-keys: expert a * 2 + b
    uniform = usage_metrics(torch.ones(n), torch.full((n,), 2.5))
    assert uniform == pytest.approx({"expert_usage": 1.0, "unevenness_kl": 0.0, "subkey_usage": 1.0}, abs=1e-12)
    one_hot = usage_metrics(torch.tensor([3.0, 0, 0, 0]), torch.tensor([1.5, 0, 0, 0]))
    assert one_hot == pytest.approx({"expert_usage": 0.25, "unevenness_kl": math.log(n), "subkey_usage": 0.5},
                                    abs=1e-12)
    # experts 0 = (0, 0) and 2 = (1, 0): both first-set sub-keys, one of the second set's two
    mixed = usage_metrics(torch.tensor([2.0, 0, 1, 0]), torch.tensor([0.5, 0, 1.5, 0]))
    expected_kl = math.log(4) + 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    assert mixed == pytest.approx({"expert_usage": 0.5, "unevenness_kl": expected_kl, "subkey_usage": 0.75},
                                  abs=1e-12)
    empty = usage_metrics(torch.zeros(n), torch.zeros(n))
    assert math.isnan(empty["unevenness_kl"]) and empty["subkey_usage"] == 0.0
    assert "subkey_usage" not in usage_metrics(torch.ones(3), torch.ones(3))  # not n * n


def test_usage_tracking_in_forward() -> None:
    torch.manual_seed(0)
    model = PEER(**SMALL)
    x = torch.randn(11, SMALL["d_model"])
    model(x)
    assert model.usage_counts.sum() == 0  # off by default
    model.track_usage(True)
    model.eval()
    with torch.no_grad():
        model(x)
    _, ids = model.retrieve(x)
    expected_counts = torch.bincount(ids.flatten(), minlength=SMALL["num_experts"]).double()
    assert model.usage_counts.dtype == model.usage_mass.dtype == torch.float64
    torch.testing.assert_close(model.usage_counts, expected_counts)
    torch.testing.assert_close(model.usage_mass.sum(), torch.tensor(11.0 * SMALL["heads"], dtype=torch.float64))
    assert "usage_counts" not in model.state_dict()
    metrics = usage_metrics(model.usage_counts, model.usage_mass)
    assert metrics["expert_usage"] == pytest.approx(float((expected_counts > 0).double().mean()))
    model.reset_usage()
    assert model.usage_counts.sum() == 0 and model.usage_mass.sum() == 0


# ---- configuration errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,name",
    [
        (dict(num_experts=60), "num_experts"),
        (dict(topk=9), "topk"),
        (dict(topk=0), "topk"),
        (dict(d_key=7), "d_key"),
        (dict(heads=0), "heads"),
        (dict(activation="swish"), "activation"),
        (dict(query_norm="rmsnorm"), "query_norm"),
        (dict(d_model=0), "d_model"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(kernel="cutlass"), "kernel"),
        (dict(heads=2.5), "heads"),
    ],
)
def test_config_errors(overrides: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        PEER(**dict(SMALL, **overrides))
