"""`peer-dist bench model`: side-by-side training runs of a sweep spec's methods, time per counted FLOP."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from peer_dist.bench import model
from peer_dist.errors import ConfigError

SMALL = ["--steps", "4", "--log-interval", "2", "--repeats", "1", "model.peer.num_experts=1024",
         "train.micro_batch_size=4"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    model.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.timeout(300)
def test_bench_model_reports_flops_per_second_and_ratios(tmp_path: Path, tiny_data: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from peer_dist.config import load_config
    from peer_dist.data import Manifest
    from peer_dist.model.flops import model_flops_per_token

    out = tmp_path / "bench.json"
    args = _parse(["--data", str(tiny_data), "--json", str(out), *SMALL])
    assert model.run(args) == 0
    assert "time/FLOP vs dense" in capsys.readouterr().out
    report = json.loads(out.read_text())
    dense, peer = report["methods"]["dense"], report["methods"]["peer"]
    assert dense["intervals"] == peer["intervals"] == 1  # 2 intervals per run, the warm-up one dropped
    assert peer["time_per_flop_over_reference"] == pytest.approx(dense["model_flops_per_s"] / peer["model_flops_per_s"])
    assert dense["time_per_flop_over_reference"] == 1.0
    # FLOP/s = tokens/s x the model's training FLOPs per token (counted independently here)
    manifest = Manifest.load(tiny_data)
    for method, row in report["methods"].items():
        base, overrides = model._run_overrides(args, method)
        cfg = load_config(base, overrides)
        fpt = model_flops_per_token(cfg.model, manifest.vocab_size, manifest.seq_len)
        assert cfg.model.ffn == method and cfg.model.d_model == 64
        assert row["model_flops_per_s"] == pytest.approx(row["tokens_per_s"] * fpt, rel=1e-6)


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "dense,nope"], "--methods"), (["--size", "d1"], "--size"),
    (["--steps", "3", "--log-interval", "2"], "--steps"), (["--repeats", "0"], "--repeats"),
])
def test_bad_arguments_name_the_flag(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        model.run(_parse(argv))
