"""`peer-dist bench kernels`: every C kernel against the torch op it replaces, in one run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from peer_dist import native
from peer_dist.bench import kernels
from peer_dist.errors import ConfigError


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.skipif(not native.topk_available(torch.zeros(1, 1)), reason="no C compiler here")
def test_bench_kernels_agree_with_torch_and_report_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kernels.json"
    threads = torch.get_num_threads()
    try:
        assert kernels.run(_parse(["--repeats", "1", "--tokens", "64", "--json", str(out)])) == 0
    finally:
        torch.set_num_threads(threads)
    assert "speedup" in capsys.readouterr().out
    rows = {r["kernel"].split(" (")[0].split(",")[0]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"top-16 of 256", "top-16 of 50", "scores + top-16 of 1024", "argsort of 8192 expert ids",
                         "gather-dot", "row-sparse AdamW"}
    for name in ("top-16 of 256", "top-16 of 50", "argsort of 8192 expert ids"):
        assert rows[name]["max_abs_diff"] == 0.0  # same values, same order
    assert rows["gather-dot"]["max_abs_diff"] < 1e-4
    assert rows["scores + top-16 of 1024"]["max_abs_diff"] < 1e-4
    assert rows["row-sparse AdamW"]["max_abs_diff"] < 1e-6
    for r in rows.values():
        assert r["speedup"] == pytest.approx(r["torch_ms"] / r["native_ms"])


def test_bench_kernels_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="must be >= 1"):
        kernels.run(_parse(["--repeats", "0"]))
