"""PKM layer against independent references: a float64 implementation that materialises
all N composite keys, brute-forces the top-k, gathers (T, H, K, D) values and einsums;
nn.BatchNorm1d statistics; hand-planted keys and values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model.peer import QueryBatchNorm, usage_metrics
from peer_dist.model.pkm import PKM
from tests.references import all_composite_keys, LargestTensor, compare_with_reference, plant_slot, reference_retrieval

SMALL = dict(d_model=16, num_values=64, heads=2, topk=4, d_key=8)


# ---- the independent reference ----------------------------------------------------------------


def reference_pkm(x: Tensor, p: dict[str, Tensor], cfg: dict) -> Tensor:
    """Lample et al. eq. 1-3 with h heads: brute force over all N keys, gathered values, einsum."""
    x_TD, weights_THK, ids_THK = reference_retrieval(x, p, cfg)
    return torch.einsum("thk,thkd->td", weights_THK, p["memory.weight"][ids_THK]).view(x.shape)


def _compare_with_reference(model: PKM, cfg: dict, x: Tensor, rtol: float, atol: float) -> None:
    names = compare_with_reference(model, reference_pkm, cfg, x, rtol, atol)
    expected_names = {"query.weight", "sub_keys", "memory.weight"}
    if cfg["query_norm"] != "none":
        expected_names |= {"query_norm.weight", "query_norm.bias"}
    assert names == expected_names


# ---- outputs and gradients against the reference ------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
def test_matches_materialising_reference_float64(seed: int, query_norm: str) -> None:
    torch.manual_seed(seed)
    cfg = dict(SMALL, query_norm=query_norm)
    model = PKM(**cfg).double()
    with torch.no_grad():  # non-trivial affine norm parameters
        for param in model.query_norm.parameters():
            param.add_(0.3 * torch.randn_like(param))
    x = torch.randn(3, 5, SMALL["d_model"], dtype=torch.float64)
    _compare_with_reference(model, cfg, x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
def test_float32_matches_float64_reference(query_norm: str) -> None:
    torch.manual_seed(5)
    cfg = dict(SMALL, query_norm=query_norm)
    model = PKM(**cfg)
    x = torch.randn(4, 6, SMALL["d_model"])
    _compare_with_reference(model, cfg, x, rtol=1e-4, atol=1e-5)


def test_larger_table_and_topk_equal_to_n() -> None:
    # k = n: every candidate pair with (i+1)(j+1) <= n competes; many heads.
    torch.manual_seed(3)
    cfg = dict(d_model=12, num_values=36, heads=5, topk=6, d_key=6, query_norm="batchnorm")
    model = PKM(**cfg).double()
    x = torch.randn(17, 12, dtype=torch.float64)
    _compare_with_reference(model, cfg, x, rtol=1e-10, atol=1e-12)


def test_shapes_leading_dims_and_empty_input() -> None:
    model = PKM(**SMALL)
    x = torch.randn(2, 3, 5, SMALL["d_model"])
    scores, ids = model.retrieve(x)
    assert scores.shape == ids.shape == (2, 3, 5, SMALL["heads"], SMALL["topk"])
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < SMALL["num_values"]
    assert model(x).shape == x.shape
    with pytest.raises(ValueError, match="d_model=16"):
        model(torch.randn(4, 15))
    empty = torch.randn(0, SMALL["d_model"], requires_grad=True)
    y = model(empty)
    y.sum().backward()
    assert y.shape == (0, SMALL["d_model"])
    assert torch.equal(model.values.grad, torch.zeros_like(model.values))


# ---- ids are global; heads share one table ------------------------------------------------------


def test_planted_value_is_read_by_global_id() -> None:
    d_model, n, d_key = 16, 8, 8
    model = PKM(d_model, n * n, heads=1, topk=3, d_key=d_key, query_norm="none")
    a_star, b_star = 5, 3  # global id 43: larger than any candidate-list position (< 9)
    planted = a_star * n + b_star
    x, q_target = plant_slot(model, a_star, b_star)
    with torch.no_grad():
        model.values[:, d_model - 1] = 0.0  # only the planted slot writes the last coordinate
        model.values[planted] = 0.0
        model.values[planted, d_model - 1] = 10.0
    scores, ids = model.retrieve(x)
    assert int(ids[0, 0, scores[0, 0].argmax()]) == planted
    # the score is q . [C[a*]; C'[b*]] = |q|^2, recomputed by hand
    torch.testing.assert_close(scores[0, 0].max(), q_target.pow(2).sum())
    y = model(x)
    weight = scores[0, 0].softmax(-1)[ids[0, 0] == planted]
    torch.testing.assert_close(y[0, d_model - 1], (weight * 10.0).squeeze())


@pytest.mark.parametrize("query_norm", ["none", "batchnorm", "layernorm"])
def test_heads_share_keys_and_values(query_norm: str) -> None:
    # Two heads with identical query weights read the same slots of the one shared table:
    # the output is twice a one-head layer's with the same keys and values.
    torch.manual_seed(0)
    two = PKM(**dict(SMALL, heads=2, query_norm=query_norm))
    one = PKM(**dict(SMALL, heads=1, query_norm=query_norm))
    d_key = SMALL["d_key"]
    with torch.no_grad():
        two.query.weight[d_key:] = two.query.weight[:d_key]  # head 1 := head 0
        one.query.weight.copy_(two.query.weight[:d_key])
        one.sub_keys.copy_(two.sub_keys)
        one.memory.weight.copy_(two.memory.weight)
    x = torch.randn(10, SMALL["d_model"])
    _, ids = two.retrieve(x)
    assert torch.equal(ids[:, 0], ids[:, 1])
    torch.testing.assert_close(two(x), 2 * one(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query_norm,norm_params", [("batchnorm", 2 * 3 * 8), ("layernorm", 2 * 8), ("none", 0)])
def test_parameter_count_and_shapes(query_norm: str, norm_params: int) -> None:
    d, n, h, d_key = 16, 8, 3, 8
    model = PKM(d, n * n, heads=h, topk=4, d_key=d_key, query_norm=query_norm)
    expected = d * h * d_key + norm_params + 2 * n * (d_key // 2) + n * n * d
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.sub_keys.shape == (2, n, d_key // 2)
    assert model.values.shape == (n * n, d)
    assert isinstance(model.query_norm, {"batchnorm": QueryBatchNorm, "layernorm": nn.LayerNorm,
                                         "none": nn.Identity}[query_norm])


# ---- initialisation ---------------------------------------------------------------------------------


def test_init_output_variance_matches_the_docstring_formula() -> None:
    # Given the retrieval, y_d = sum_j w_j v_{id_j, d} with v ~ N(0, 1/(h k)) independent of
    # the ids and weights, so E[y_d^2] = sum_j w_j^2 / (h k) per token (duplicates across
    # heads add their weights first). Compare the empirical mean over tokens and coordinates.
    torch.manual_seed(0)
    heads, topk, d_model = 4, 8, 512
    model = PKM(d_model, 32 * 32, heads=heads, topk=topk, d_key=16)
    x = torch.randn(256, d_model)
    with torch.no_grad():
        y = model(x)
        scores, ids = model.retrieve(x)
        weights = scores.softmax(-1).reshape(256, -1)
        dense_TN = torch.zeros(256, 32 * 32).scatter_add_(1, ids.reshape(256, -1), weights)
    predicted = dense_TN.pow(2).sum(-1).mean() / (heads * topk)
    assert float(y.pow(2).mean()) == pytest.approx(float(predicted), rel=0.03)
    assert 1 / topk**2 <= float(predicted) <= 1 / topk  # the docstring's bounds
    assert float(model.values.detach().std()) == pytest.approx((heads * topk) ** -0.5, rel=0.05)


# ---- streaming: nothing of size (T, h*k, D) ------------------------------------------------------


def test_no_gathered_tensor_in_forward_or_backward() -> None:
    tokens, heads, topk, d_model = 64, 4, 8, 64
    cfg = dict(d_model=d_model, num_values=256, heads=heads, topk=topk, d_key=16, query_norm="batchnorm")
    gathered = tokens * heads * topk * d_model  # 131072; the table is 16384
    x = torch.randn(tokens, d_model, requires_grad=True)
    model = PKM(**cfg)
    with LargestTensor() as ours:
        model(x).sum().backward()
    assert ours.largest < gathered // 4

    # the check has teeth: the materialising reference trips it
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    with LargestTensor() as naive:
        reference_pkm(x, params, cfg).sum().backward()
    assert naive.largest >= gathered


# ---- query BatchNorm: data-parallel hook, eval mode -------------------------------------------------


def test_batchnorm_uses_reduce_stats_hook_and_running_stats_in_eval() -> None:
    torch.manual_seed(0)
    model = PKM(**SMALL)
    calls = []
    model.query_norm.reduce_stats = lambda stats: calls.append(stats.shape) or stats
    model(torch.randn(5, SMALL["d_model"]))
    assert calls == [torch.Size([2 * SMALL["heads"] * SMALL["d_key"] + 1])]
    model.eval()
    x = torch.randn(7, SMALL["d_model"])
    y = model(x)
    assert len(calls) == 1  # eval uses running stats, no reduction
    # eval == the reference with the running statistics in place of batch statistics
    norm = model.query_norm
    q = F.batch_norm(x @ model.query.weight.t(), norm.running_mean, norm.running_var, norm.weight, norm.bias,
                     training=False, eps=1e-5).view(7, SMALL["heads"], SMALL["d_key"])
    scores, ids = torch.einsum("thq,nq->thn", q, all_composite_keys(model.sub_keys)).topk(SMALL["topk"], dim=-1)
    expected = torch.einsum("thk,thkd->td", scores.softmax(-1), model.values[ids])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


# ---- usage tracking (PEER paper Table 2 metrics) -----------------------------------------------------


def test_usage_tracking_counts() -> None:
    torch.manual_seed(0)
    model = PKM(**SMALL)
    x = torch.randn(11, SMALL["d_model"])
    model(x)
    assert model.usage_counts.sum() == 0  # off by default
    model.track_usage(True)
    model.eval()
    with torch.no_grad():
        model(x)
        model(x[:4])
    scores, ids = model.retrieve(x)
    expected_counts = torch.bincount(torch.cat([ids.flatten(), ids[:4].flatten()]), minlength=64).double()
    weights = scores.softmax(-1).double()
    expected_mass = torch.zeros(64, dtype=torch.float64).index_add_(0, ids.flatten(), weights.flatten())
    expected_mass.index_add_(0, ids[:4].flatten(), weights[:4].flatten())
    assert model.usage_counts.shape == model.usage_mass.shape == (SMALL["num_values"],)
    assert model.usage_counts.dtype == model.usage_mass.dtype == torch.float64
    torch.testing.assert_close(model.usage_counts, expected_counts)
    torch.testing.assert_close(model.usage_mass, expected_mass)
    torch.testing.assert_close(model.usage_mass.sum(), torch.tensor(15.0 * SMALL["heads"], dtype=torch.float64))
    assert "usage_counts" not in model.state_dict()
    metrics = usage_metrics(model.usage_counts, model.usage_mass)
    assert metrics["expert_usage"] == pytest.approx(float((expected_counts > 0).double().mean()))
    model.reset_usage()
    assert model.usage_counts.sum() == 0 and model.usage_mass.sum() == 0
    model.track_usage(False)
    model(x)
    assert model.usage_counts.sum() == 0


def test_usage_buffers_stay_float64_after_dtype_cast() -> None:
    model = PKM(**SMALL).to(torch.bfloat16)
    model.track_usage(True)
    model(torch.randn(3, SMALL["d_model"], dtype=torch.bfloat16))
    assert model.usage_counts.dtype == torch.float64
    assert float(model.usage_counts.sum()) == 3 * SMALL["heads"] * SMALL["topk"]


# ---- configuration errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,name",
    [
        (dict(num_values=60), "num_values"),
        (dict(topk=9), "topk"),
        (dict(topk=0), "topk"),
        (dict(d_key=7), "d_key"),
        (dict(d_key=0), "d_key"),
        (dict(heads=0), "heads"),
        (dict(query_norm="rmsnorm"), "query_norm"),
        (dict(d_model=0), "d_model"),
        (dict(heads=2.5), "heads"),
        (dict(num_values=True), "num_values"),
    ],
)
def test_config_errors(overrides: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        PKM(**dict(SMALL, **overrides))
