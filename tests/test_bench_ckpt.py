"""`peer-dist bench ckpt`: the in-run arithmetic against hand-computed numbers, and two real runs end to end."""

from __future__ import annotations

import argparse
import json
import statistics
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


def test_summarize_uses_the_steps_without_a_save_of_the_same_run() -> None:
    # 8 steps of 100 tokens, a save after steps 2, 4 and 6 (the final one at 8 is not an interval save).
    # Step s's interval holds the save of step s - 1: steps 3, 5 and 7 carry 0.5, 0.7 and 0.6 s of it.
    seconds = {1: 9.0, 2: 1.0, 3: 1.1 + 0.5, 4: 1.2, 5: 1.0 + 0.7, 6: 0.9, 7: 1.3 + 0.6, 8: 1.1}
    rows = [{"step": s, "train/tokens_per_s": 100 / t} for s, t in seconds.items()]
    rows += [{"step": s, "ckpt/blocking_s": b} for s, b in ((2, 0.5), (4, 0.7), (6, 0.6), (8, 3.0))]
    out = ckpt.summarize(rows, steps=8, interval=2, tokens_per_step=100, checkpoint_mb=1.0)
    assert out["interval_saves"] == 3 and out["blocking_s"] == [0.5, 0.7, 0.6]
    clean = [1.0, 1.2, 0.9, 1.1]  # steps 2, 4, 6, 8: no warm-up step 1, no step holding a save
    assert out["clean_steps"] == 4
    assert out["step_s_median"] == pytest.approx(1.05)
    assert out["step_s_p10"] == pytest.approx(0.93) and out["step_s_p90"] == pytest.approx(1.17)
    assert out["blocking_s_median"] == pytest.approx(0.6)
    assert out["cost_per_interval"] == pytest.approx(0.6 / (2 * 1.05))
    assert out["after_save_step_s_median"] == pytest.approx(statistics.median([1.1, 1.0, 1.3]))
    assert statistics.median(clean) == pytest.approx(out["step_s_median"])


@pytest.mark.timeout(400)
def test_bench_ckpt_runs_both_modes(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ckpt.json"
    args = _parse(["--data", str(tiny_data), "--steps", "6", "--interval", "2", "--batch", "4", "--json", str(out),
                   *TINY_MODEL])
    assert ckpt.run(args) == 0
    modes = json.loads(out.read_text())["modes"]
    assert list(modes) == ["sync", "async"]
    for row in modes.values():
        assert row["interval_saves"] == 2 and all(b > 0 for b in row["blocking_s"])
        assert row["clean_steps"] == 3  # steps 2, 4, 6
        assert row["step_s_p10"] <= row["step_s_median"] <= row["step_s_p90"]
        assert row["cost_per_interval"] == pytest.approx(row["blocking_s_median"] / (2 * row["step_s_median"]))
        assert row["cost_per_interval"] > 0
    assert modes["sync"]["checkpoint_mb"] == pytest.approx(modes["async"]["checkpoint_mb"], rel=0.01)
    text = capsys.readouterr().out
    assert "blocked s/save" in text and "cost/interval" in text
    for mode, row in modes.items():  # the printed share is the JSON's, positive
        line = next(line for line in text.splitlines() if line.startswith(mode))
        assert f" {100 * row['cost_per_interval']:.1f}%" in line


def test_bench_ckpt_argument_errors(tmp_path: Path, tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match="no prepared data"):
        ckpt.run(_parse(["--data", str(tmp_path / "none")]))
    with pytest.raises(ConfigError, match="at least two interval checkpoints"):
        ckpt.run(_parse(["--data", str(tiny_data), "--steps", "5", "--interval", "5"]))
    with pytest.raises(ConfigError, match="--interval 1: must be at least 2"):
        ckpt.run(_parse(["--data", str(tiny_data), "--steps", "5", "--interval", "1"]))
