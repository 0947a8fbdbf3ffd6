"""`peer-dist bench ckpt` end to end at a tiny size: three real runs, one report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from peer_dist.bench import ckpt
from peer_dist.errors import ConfigError

TINY_MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.peer.num_experts=256",
              "model.peer.heads=2", "model.peer.topk=4", "model.peer.d_key=16"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ckpt.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.timeout(400)
def test_bench_ckpt_runs_three_modes(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ckpt.json"
    args = _parse(["--data", str(tiny_data), "--steps", "4", "--interval", "2", "--batch", "4", "--json", str(out),
                   *TINY_MODEL])
    assert ckpt.run(args) == 0
    modes = json.loads(out.read_text())["modes"]
    assert [modes[m]["interval_saves"] for m in ("none", "sync", "async")] == [0, 1, 1]
    assert modes["none"]["blocking_s_median"] == 0 and modes["sync"]["blocking_s_median"] > 0
    assert modes["sync"]["checkpoint_mb"] == pytest.approx(modes["async"]["checkpoint_mb"], rel=0.01)
    assert "blocked s/save" in capsys.readouterr().out


def test_bench_ckpt_argument_errors(tmp_path: Path, tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match="no prepared data"):
        ckpt.run(_parse(["--data", str(tmp_path / "none")]))
    with pytest.raises(ConfigError, match="at least two interval checkpoints"):
        ckpt.run(_parse(["--data", str(tiny_data), "--steps", "5", "--interval", "5"]))
