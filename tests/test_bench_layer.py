"""Smoke test of `peer-dist bench layer` at tiny sizes, and its naive reference against PEER."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from peer_dist.bench import layer
from peer_dist.errors import ConfigError
from peer_dist.model.peer import PEER

TINY = ["--experts", "64", "--heads", "2", "--topk", "4", "--d-model", "16", "--d-key", "8", "--tokens", "32"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    layer.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_are_the_paper_scale_benchmark() -> None:
    args = _parse([])
    assert (args.experts, args.heads, args.topk, args.d_model) == (256 * 256, 8, 16, 512)
    assert args.tokens >= 2048 and args.repeats >= 3


@pytest.mark.parametrize("activation_norm", ["batchnorm", "none"])
def test_naive_reference_agrees_with_peer(activation_norm: str) -> None:
    torch.manual_seed(0)
    peer = PEER(16, 64, heads=2, topk=4, d_key=8, query_norm=activation_norm).double()
    naive = layer.NaivePEER(peer)
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(20, 16, dtype=torch.float64)
    results = []
    for model in (peer, naive):
        y = layer._step(model, x, grad_y)
        results.append([y, x.grad.clone()] + [p.grad.clone() for p in peer.parameters()])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_bench_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert layer.run(_parse(TINY + ["--repeats", "2", "--threads", "1", "--json", str(out)])) == 0
    printed = capsys.readouterr().out
    for word in ("ours", "naive", "dense", "naive/ours", "ms/1k tok", "peak MB"):
        assert word in printed
    results = json.loads(out.read_text())
    assert set(results["variants"]) == {"ours", "naive", "dense"}
    assert results["agreement"]["ok"] and max(results["agreement"]["max_rel_err"].values()) < 1e-4
    assert {"y", "x.grad", "experts.u", "experts.v", "sub_keys", "query.weight"} <= set(results["agreement"]["max_rel_err"])
    for row in results["variants"].values():
        assert len(row["times_ms"]) == 2 and row["ms_per_1k_tokens"] > 0 and row["peak_mb"] >= 0
        assert row["us_per_token"] == pytest.approx(row["ms_per_1k_tokens"])
    assert results["ratios"]["naive_over_ours_time"] > 0


@pytest.mark.parametrize(
    "argv,flag",
    [(["--tokens", "0"], "--tokens"), (["--experts", "1000"], "num_experts"), (["--topk", "99"], "topk")],
)
def test_bad_arguments_raise_config_error(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        layer.run(_parse(TINY + argv))
