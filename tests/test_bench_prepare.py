"""`peer-dist bench prepare` at a tiny size: the synthetic corpus, the measured runs and the report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from peer_dist.bench import prepare as bench
from peer_dist.errors import ConfigError


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_synthetic_corpus_is_seeded_jsonl_of_the_asked_size(tmp_path: Path) -> None:
    size = bench.write_corpus(tmp_path / "a", 300_000, 100_000, seed=0)
    bench.write_corpus(tmp_path / "b", 300_000, 100_000, seed=0)
    files = sorted((tmp_path / "a").iterdir())
    assert size == sum(f.stat().st_size for f in files) and 300_000 <= size < 300_000 + 20_000
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted((tmp_path / "b").iterdir())]
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(len(records)))
    assert all(r["text"].startswith(f"document {r['id']}: ") for r in records)


@pytest.mark.timeout(120)
def test_bench_prepare_reports_each_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    args = _parse(["--mb", "1", "--file-mb", "0.5", "--repeats", "1", "--tokenizers", "byte", "--dir",
                   str(tmp_path / "work"), "--json", str(out)])
    assert bench.run(args) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["tokenizer"], r["workers"]) for r in rows] == [("byte", 1), ("byte", 2)]
    assert rows[0]["scaling"] == 1.0 and rows[1]["scaling"] == rows[1]["mb_per_s"] / rows[0]["mb_per_s"]
    assert all(r["mb_per_s"] > 0 and 20 < r["worker_peak_rss_mb"] < 1000 for r in rows)
    assert set(result["control_cores"]) == {"1", "2"}
    printed = capsys.readouterr().out
    assert "control, pure-CPU processes" in printed and f"{rows[1]['mb_per_s']:8.2f}" in printed
    with pytest.raises(ConfigError, match="--tokenizers"):
        bench.run(_parse(["--tokenizers", "wordpiece"]))
