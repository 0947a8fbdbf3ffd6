"""Elastic resume: a checkpoint written by 4 ranks at EP = 2 continues at 2 ranks (EP = 2 and
EP = 1) and at 1 rank. Expert tables and their Adam moments are resharded by global expert id;
with the global batch kept at 8, the data continues where it stopped. Every continuation must
equal one process trained straight through (losses and final weights, 1e-5), which fails if a
row, a moment or a batch went astray. The consolidated export loads at any world size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import assert_same_run, run_cli
from tests.test_train import TINY

pytestmark = pytest.mark.timeout(900)

STEPS = 6
COMMON = [*TINY, f"train.max_steps={STEPS}", "train.eval_interval=0", "train.zero_stage=1"]


def _args(data: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    return ["train", *COMMON, f"data.path={data}", f"run.dir={tmp}", f"run.name={name}", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("elastic")
    run_cli(_args(tiny_data, tmp, "straight", "train.micro_batch_size=8"), timeout=280)
    # 4 ranks, EP = 2, stopped after step 3 by a stop signal on every rank (checkpoint, exit 75).
    proc = run_cli(_args(tiny_data, tmp, "saved4", "train.micro_batch_size=2", "parallel.ep=2",
                         'faults.inject=["signal:step=3:sig=SIGTERM"]'), nproc=4, timeout=400, check=False)
    assert "stopped on a signal at step 3" in proc.stdout, proc.stderr[-3000:]
    return {"straight": tmp / "straight", "saved4": tmp / "saved4", "tmp": tmp}


@pytest.mark.parametrize("nproc,extra", [(2, ["parallel.ep=2", "train.micro_batch_size=4"]),
                                         (2, ["parallel.ep=1", "train.micro_batch_size=4"]),
                                         (1, ["parallel.ep=1", "train.micro_batch_size=8"])],
                         ids=["2ranks-ep2", "2ranks-ep1", "1rank"])
def test_resume_at_another_layout_equals_straight_run(runs: dict[str, Path], tiny_data: Path, nproc: int,
                                                      extra: list[str]) -> None:
    name = f"from4-{nproc}-{extra[0].split('=')[1]}"
    shutil.copytree(runs["saved4"], runs["tmp"] / name)
    proc = run_cli(_args(tiny_data, runs["tmp"], name, *extra),
                   nproc=nproc, timeout=400)
    assert "elastic resume" in proc.stderr and "resumed from" in proc.stderr
    assert "batch statistics" not in proc.stderr  # micro-batch x ranks stays 8: the same BatchNorm batches
    assert_same_run(runs["tmp"] / name, runs["straight"], steps=STEPS)


def test_a_resume_that_changes_the_batchnorm_batch_says_so(runs: dict[str, Path], tiny_data: Path) -> None:
    """Global batch 8 kept, but as 2 micro-steps of 4: the query BatchNorm normalises over 4
    sequences instead of 8. Allowed, with a warning that names both numbers."""
    shutil.copytree(runs["saved4"], runs["tmp"] / "accum2")
    proc = run_cli(_args(tiny_data, runs["tmp"], "accum2", "parallel.ep=1", "train.micro_batch_size=4",
                         "train.grad_accum=2"), timeout=280)
    assert "batch statistics (query BatchNorm, MoE load balance) span: 8 sequences per micro-step before " \
        "(checkpoint), 4 now (train.micro_batch_size 4 x data-parallel 1, train.grad_accum 2)" in proc.stderr
    assert "resumed from" in proc.stderr and "step 6" in proc.stdout


def test_another_global_batch_is_refused(runs: dict[str, Path], tiny_data: Path) -> None:
    shutil.copytree(runs["saved4"], runs["tmp"] / "bigger")
    before = sorted(p.name for p in (runs["tmp"] / "bigger" / "checkpoints").iterdir())
    proc = run_cli(_args(tiny_data, runs["tmp"], "bigger", "train.micro_batch_size=16"), check=False, timeout=120)
    assert proc.returncode == 2 and "global_batch=8" in proc.stderr and "global_batch=16" in proc.stderr
    assert sorted(p.name for p in (runs["tmp"] / "bigger" / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("nproc", [1, 2])
def test_export_evaluates_at_any_world_size(runs: dict[str, Path], tiny_data: Path, nproc: int) -> None:
    export = runs["tmp"] / "export"
    if not export.exists():
        run_cli(["export", str(runs["saved4"]), "--output", str(export)])
    direct = run_cli(["eval", str(runs["saved4"]), "--batches", "2", "--batch-size", "4"], nproc=nproc).stdout
    exported = run_cli(["eval", str(export), "--batches", "2", "--batch-size", "4"], nproc=nproc).stdout
    loss = [float(out.split("validation loss ")[1].split()[0]) for out in (direct, exported)]
    assert loss[0] == loss[1]
    proc = run_cli(["export", str(runs["saved4"]), "--output", str(export)], check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_each_rank_reads_only_the_saved_shards_that_hold_its_rows() -> None:
    """Per-rank bytes read on resume fall with EP: the saved shards whose expert positions meet
    this rank's (own shard at the same EP; two when EP halves; one when it doubles), and every
    shard only when the owner layout changed (rows then come from anywhere)."""
    from peer_dist.checkpoint.portable import expert_files_to_read
    from peer_dist.model.expert_tables import ExpertSharding
    from peer_dist.parallel.layout import ParallelLayout

    def shards(saved_ep: int) -> list[str]:
        return ["dense.pt"] + [f"experts/blocks.1.ffn.experts.ep{k:03d}.pt" for k in range(saved_ep)]

    def read(saved_ep: int | None, new_ep: int, rank: int, files_of: int) -> list[int]:
        names = expert_files_to_read(shards(files_of), ParallelLayout(new_ep, ep=new_ep), rank, saved_ep)
        return [int(n[-6:-3]) for n in names]

    assert read(4, 4, 2, 4) == [2]
    assert read(4, 2, 1, 4) == [2, 3] and read(2, 4, 3, 2) == [1] and read(1, 4, 3, 1) == [0]
    assert read(4, 1, 0, 4) == [0, 1, 2, 3] and read(None, 4, 2, 4) == [0, 1, 2, 3]
    # The rule matches the owners: rank r of E reads exactly the saved shards that hold its rows.
    n = 4096
    for saved_ep, new_ep in [(4, 2), (2, 4), (4, 8), (8, 2), (3, 6)]:
        for layout in ("permuted", "contiguous"):
            saved = ExpertSharding(n // 24 * 24, saved_ep, 0, layout)
            for r in range(new_ep):
                mine = ExpertSharding(n // 24 * 24, new_ep, r, layout).global_ids()
                owners = set(saved.owner(mine).tolist())
                assert owners == set(read(saved_ep, new_ep, r, saved_ep)), (saved_ep, new_ep, layout, r)
