"""`peer-dist bench layer` at tiny sizes (report structure, sweep, floor), and its naive reference against PEER."""

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
    assert (args.experts, args.heads, args.topk, args.d_model) == (str(256 * 256), 8, 16, 512)
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
        peer.zero_grad(set_to_none=True)
        x.grad = None
        y = model(x)
        y.backward(grad_y)
        results.append([y, x.grad.clone()] + [p.grad.clone() for p in peer.parameters()])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_bench_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = TINY + ["--experts", "64,256", "--reference-max-experts", "64", "--repeats", "2", "--threads", "1",
                   "--json", str(out)]
    assert layer.run(_parse(argv)) == 0
    printed = capsys.readouterr().out
    for word in ("fwd+bwd+update", "ours_dense", "row KB/tok", "row GB/s", "of copy", "device=cpu dtype=fp32", "naive/ours", "ms/1k tok", "peak MB", "floor:", "ours/floor",
                 "sweep: ours at N=256 vs N=64", "references skipped"):
        assert word in printed
    report = json.loads(out.read_text())
    small, large = report["runs"]
    assert set(small["variants"]) == {"ours", "ours_dense", "naive", "dense"} and set(large["variants"]) == {"ours"}
    assert small["agreement"]["ok"] and max(small["agreement"]["max_rel_err"].values()) < 1e-4
    assert {"y", "x.grad", "experts.u", "experts.v", "sub_keys", "query.weight"} <= set(small["agreement"]["max_rel_err"])
    for run in report["runs"]:
        for row in run["variants"].values():
            assert len(row["times_ms"]) == 2 and row["ms_per_1k_tokens"] > 0 and row["peak_mb"] >= 0
        # 32 tokens x 2 heads x 4 retrievals: at most 256 distinct experts, and never more than N
        assert 0 < run["distinct_experts"] <= min(256, run["config"]["experts"])
        floor = run["floor"]
        assert floor["bytes"] == run["distinct_experts"] * 2 * 2 * 16 * 4 and floor["copy_gb_per_s"] > 0
        assert floor["ours_over_floor"] == pytest.approx(run["variants"]["ours"]["median_step_ms"] / floor["ms"])
    assert small["ratios"]["naive_over_ours_time"] > 0
    for name, row in small["variants"].items():  # row traffic: 32 tokens x 8 pairs, fp32 rows of 16
        if name == "dense":
            assert "row_gb_per_s" not in row  # moves no expert rows
            continue
        row_bytes = 4 * 32 * 8 * 16 * 4 + small["distinct_experts"] * 2 * 16 * (4 + 2 * 4)
        assert row["row_bytes_per_token"] == pytest.approx(row_bytes / 32)
        assert row["row_gb_per_s"] == pytest.approx(row_bytes / (row["median_step_ms"] / 1e3) / 1e9)
        assert row["row_fraction_of_copy"] == pytest.approx(row["row_gb_per_s"] / small["floor"]["copy_gb_per_s"])
    assert "ours_torch" not in small["variants"]  # on CPU ours is the torch path
    assert report["device"]
    sweep = report["sweep"]
    assert sweep["time_ratio"] == pytest.approx(large["variants"]["ours"]["median_step_ms"]
                                                / small["variants"]["ours"]["median_step_ms"])


@pytest.mark.parametrize(
    "argv,flag",
    [(["--tokens", "0"], "--tokens"), (["--experts", "1000"], "num_experts"), (["--topk", "99"], "topk"),
     (["--experts", "64,x"], "--experts")],
)
def test_bad_arguments_raise_config_error(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        layer.run(_parse(TINY + argv))


def test_row_traffic_counts_pair_reads_and_distinct_row_updates() -> None:
    # 16k tokens x 128 pairs of bf16 rows of 1024, 860k distinct experts (N = 1024^2)
    pairs, distinct = 16384 * 128, 860_000
    expected = 4 * pairs * 1024 * 2 + distinct * 2 * 1024 * (4 + 4)
    assert layer.row_traffic_bytes(pairs, distinct, 1024, 2) == expected
    assert layer.row_traffic_bytes(pairs, 0, 1024, 4) == 2 * layer.row_traffic_bytes(pairs, 0, 1024, 2)


def test_bf16_run_agrees_with_naive(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert layer.run(_parse(TINY + ["--repeats", "1", "--threads", "1", "--dtype", "bf16", "--json", str(out)])) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["config"]["dtype"] == "bf16"
    # bf16 rows are half the bytes of fp32 ones; the fp32 gradient row stays 4 bytes
    assert run["variants"]["ours"]["row_bytes_per_token"] == pytest.approx(
        (4 * 32 * 8 * 16 * 2 + run["distinct_experts"] * 2 * 16 * (4 + 2 * 2)) / 32)
    assert run["agreement"]["ok"] and 0 < max(run["agreement"]["max_rel_err"].values()) < 5e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--device cuda"):
        layer.run(_parse(TINY + ["--device", "cuda"]))
