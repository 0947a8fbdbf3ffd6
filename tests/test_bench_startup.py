"""`peer-dist bench startup` end to end at a tiny size: fresh and resumed runs at EP 1 and 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from peer_dist.bench import startup
from peer_dist.errors import ConfigError
from tests.test_bench_ckpt import TINY_MODEL


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    startup.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.timeout(400)
def test_a_rank_reads_half_the_checkpoint_at_ep2(tmp_path: Path, tiny_data: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "startup.json"
    assert startup.run(_parse(["--data", str(tiny_data), "--ep", "1,2", "--json", str(out),
                               *TINY_MODEL, "model.peer.num_experts=16384"])) == 0
    ep = json.loads(out.read_text())["ep"]
    # Each rank's expert shard halves; the dense part (read by every rank) does not.
    assert ep["2"]["shard_mb"] == pytest.approx(ep["1"]["shard_mb"] / 2, rel=0.02)
    dense = ep["1"]["read_mb"] - ep["1"]["shard_mb"]
    assert ep["2"]["read_mb"] == pytest.approx(dense + ep["2"]["shard_mb"], rel=0.05)
    assert all(r["set_up_s"] > 0 and r["resume_s"] > 0 for r in ep.values())
    assert "read vs EP 1" in capsys.readouterr().out


def test_bench_startup_argument_errors(tmp_path: Path, tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match="no prepared data"):
        startup.run(_parse(["--data", str(tmp_path / "none")]))
    with pytest.raises(ConfigError, match="comma-separated"):
        startup.run(_parse(["--data", str(tiny_data), "--ep", "two"]))
