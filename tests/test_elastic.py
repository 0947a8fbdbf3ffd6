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
