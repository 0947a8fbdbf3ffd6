"""The fault matrix: real runs with injected faults; after a restart of the same command
nothing is lost (losses and weights equal the uninterrupted run) or the job ends
non-zero in bounded time.

Faults come from `faults.inject` (peer_dist/train/faults.py); each fires once per run
folder, so the restart passes the same step without it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from peer_dist.checkpoint.store import latest_good, list_checkpoints, verify
from peer_dist.data import Manifest, SampleOrder
from tests.helpers import ROOT, TORCHRUN, _env, final_weights, read_metrics, run_cli
from tests.test_resume import STEPS, _args, _assert_matches, _losses_by_step

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

TWO = ["train.micro_batch_size=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """2 ranks, no fault: what every recovered run must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    run_cli(_args(tiny_data, tmp, "ref", TWO), nproc=2, timeout=280)
    return tmp / "ref"


def _run(tmp: Path, data: Path, extra: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run_cli(_args(data, tmp, "run", [*TWO, *extra]), nproc=2, timeout=280, check=check, **kw)


@pytest.mark.parametrize("fault", ["crash:step=5:rank=1", "crash_in_save:step=6:rank=1:phase=written",
                                   "crash_in_save:step=6:rank=0:phase=commit", "signal:step=5:rank=1:sig=SIGUSR1",
                                   "signal:step=7:rank=0:sig=SIGKILL"])
def test_fault_then_restart_equals_uninterrupted(tmp_path: Path, tiny_data: Path, reference: Path, fault: str) -> None:
    first = _run(tmp_path, tiny_data, [f"faults.inject=[\"{fault}\"]"], check=False)
    assert first.returncode != 0, "the fault did not stop the run"
    # Nothing half-written is taken for a checkpoint.
    for ckpt in list_checkpoints(tmp_path / "run" / "checkpoints"):
        assert verify(ckpt) is None, ckpt.path
    _run(tmp_path, tiny_data, [f"faults.inject=[\"{fault}\"]"])  # same command: the fault already fired
    _assert_matches(tmp_path / "run", reference)


def test_crash_with_max_restarts_recovers_in_one_command(tmp_path: Path, tiny_data: Path, reference: Path) -> None:
    """torchrun restarts every worker after one dies; they resume from the last checkpoint."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "--max-restarts=1", "-m", "peer_dist.cli",
           *_args(tiny_data, tmp_path, "run", [*TWO, 'faults.inject=["crash:step=5:rank=1"]'])]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step_000003" in proc.stderr
    _assert_matches(tmp_path / "run", reference)


def test_damaged_checkpoints_fall_back_to_the_previous_good_one(tmp_path: Path, tiny_data: Path,
                                                               reference: Path) -> None:
    """The newest checkpoint corrupted (by a fault) and the one before truncated: the restart
    says so and resumes from the one before those, then continues exactly."""
    first = _run(tmp_path, tiny_data, ['faults.inject=["corrupt_checkpoint:step=9:rank=0:file=state/dense.pt",'
                                       '"crash:step=10:rank=0"]', "train.ckpt_keep=4"], check=False)
    assert first.returncode != 0
    ckpts = tmp_path / "run" / "checkpoints"
    victim = ckpts / "step_000006" / "state" / "dense.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    second = _run(tmp_path, tiny_data, ['faults.inject=["corrupt_checkpoint:step=9:rank=0:file=state/dense.pt",'
                                        '"crash:step=10:rank=0"]', "train.ckpt_keep=4"])
    assert "skipping checkpoint" in second.stderr and "step_000009" in second.stderr and "step_000006" in second.stderr
    assert "resumed from" in second.stderr and "step_000003" in second.stderr
    _assert_matches(tmp_path / "run", reference)


def test_hang_ends_the_job_within_the_collective_timeout(tmp_path: Path, tiny_data: Path) -> None:
    start = time.monotonic()
    proc = _run(tmp_path, tiny_data, ['faults.inject=["hang:step=4:rank=1"]', "train.collective_timeout_s=15"],
                check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 150, (proc.returncode, elapsed)


def test_nan_on_one_rank_skips_that_step_everywhere(tmp_path: Path, tiny_data: Path) -> None:
    _run(tmp_path, tiny_data, ['faults.inject=["nan:step=5:rank=1"]', "train.ckpt_interval=1", "train.ckpt_keep=20"])
    ckpts = tmp_path / "run" / "checkpoints"
    weights = {s: final_weights(ckpts / f"step_{s:06d}") for s in (4, 5, 6)}
    for name in weights[4]:  # step 5 changed nothing (weights, BatchNorm statistics); step 6 is normal again
        assert torch.equal(weights[5][name], weights[4][name]), name
    assert any(not torch.equal(weights[6][n], weights[5][n]) for n in weights[5])
    last = [r for r in read_metrics(tmp_path / "run") if "train/bad_steps" in r][-1]
    assert last["train/bad_steps"] == 1 and last["train/rollbacks"] == 0
    assert all(torch.isfinite(w).all() for w in weights[6].values())
    # The skipped step's NaN is no part of the logged training loss: its interval (log_interval=1)
    # logs no loss, and an interval of 2 holding it logs the good step's loss alone.
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run") if "train/tokens_per_s" in r}
    assert "train/loss" not in rows[5] and rows[5]["train/tokens_per_s"] > 0
    assert all(r["train/loss"] == r["train/loss"] for s, r in rows.items() if s != 5)
    run_cli(_args(tiny_data, tmp_path, "pairs", [*TWO, 'faults.inject=["nan:step=5:rank=1"]', "train.log_interval=2"]),
            nproc=2, timeout=280)
    pairs = {r["step"]: r for r in read_metrics(tmp_path / "pairs") if "train/tokens_per_s" in r}
    assert pairs[6]["train/loss"] == pytest.approx(rows[6]["train/loss"], rel=1e-6)
    assert pairs[4]["train/loss"] == pytest.approx((rows[3]["train/loss"] + rows[4]["train/loss"]) / 2, rel=1e-6)


def test_repeated_nans_roll_back_and_skip_the_window_deterministically(tmp_path: Path, tiny_data: Path) -> None:
    faults = 'faults.inject=["nan:step=5:rank=0","nan:step=6:rank=1","nan:step=7:rank=0"]'
    runs = []
    for name in ("a", "b"):
        run_cli(_args(tiny_data, tmp_path, name, [*TWO, faults, "guard.max_bad_steps=3", "train.ckpt_interval=4"]),
                nproc=2, timeout=280)
        runs.append(tmp_path / name)
    state = latest_good(runs[0] / "checkpoints").trainer_state()
    assert state["step"] == STEPS and state["data_skips"] == {"windows": [[5, 7]]}  # data steps 5..7 never again
    last = [r for r in read_metrics(runs[0]) if "train/rollbacks" in r][-1]
    assert last["train/rollbacks"] == 1 and last["train/bad_steps"] == 3
    losses = _losses_by_step(runs[0])
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(v == v for v in losses.values())
    a, b = final_weights(runs[0]), final_weights(runs[1])
    for name in a:  # the same faults give the same run, bit for bit
        assert torch.equal(a[name], b[name]), name


def test_corrupt_shard_is_skipped_and_counted(tmp_path: Path, tiny_data: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shards = Manifest.load(data).shards("train")
    first = int(SampleOrder([x.samples for x in shards], seed=0).shard_order(0)[0])  # read at step 1
    shard = data / shards[first].file
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF
    shard.write_bytes(bytes(raw))
    run_cli(_args(data, tmp_path, "run", [*TWO, "data.bad_shard=skip"]), nproc=2, timeout=280)
    rows = [r for r in read_metrics(tmp_path / "run") if "data/skipped_shards" in r]
    assert rows[-1]["data/skipped_shards"] == 1 and rows[-1]["data/skipped_samples"] > 0
    proc = run_cli(_args(data, tmp_path, "err", TWO), nproc=2, timeout=280, check=False)
    assert proc.returncode != 0 and "bad_shard=skip" in proc.stderr


def test_fault_specs_are_checked_before_any_work(tmp_path: Path, tiny_data: Path) -> None:
    proc = run_cli(_args(tiny_data, tmp_path, "run", ['faults.inject=["explode:step=3"]']), check=False, timeout=120)
    assert proc.returncode == 2 and "explode" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_async_save_equals_sync_and_survives_a_crash_during_the_write(tmp_path: Path, tiny_data: Path,
                                                                       reference: Path) -> None:
    """train.async_save: the same checkpoints and run as synchronous saves; a rank dying while its
    background thread writes step 6 leaves step 3 as the newest valid checkpoint."""
    fault = 'faults.inject=["crash_in_save:step=6:rank=1:phase=written"]'
    first = _run(tmp_path, tiny_data, ["train.async_save=true", fault], check=False)
    assert first.returncode != 0
    assert [c.step for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == [3]
    assert verify(latest_good(tmp_path / "run" / "checkpoints")) is None
    _run(tmp_path, tiny_data, ["train.async_save=true", fault])
    _assert_matches(tmp_path / "run", reference)
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.step for c in ckpts] == [12, 9, 6] and all(verify(c) is None for c in ckpts)


def test_finite_loss_with_nan_gradients_on_one_rank_is_skipped(tmp_path: Path, tiny_data: Path) -> None:
    """Rank 1's backward of step 5 gives NaN gradients while every loss stays finite: the guard
    must still skip the step on both ranks (weights unchanged, counted, logged), not apply it."""
    _run(tmp_path, tiny_data, ['faults.inject=["nan_grad:step=5:rank=1"]', "train.ckpt_interval=1",
                               "train.ckpt_keep=20"])
    ckpts = tmp_path / "run" / "checkpoints"
    weights = {s: final_weights(ckpts / f"step_{s:06d}") for s in (4, 5, 6)}
    for name in weights[4]:
        assert torch.equal(weights[5][name], weights[4][name]), name
    assert all(torch.isfinite(w).all() for w in weights[6].values())
    last = [r for r in read_metrics(tmp_path / "run") if "train/bad_steps" in r][-1]
    assert last["train/bad_steps"] == 1
# ---------------------------------------------------------------------------- the run folder, the checkpoint choice


def test_a_killed_launcher_takes_its_ranks_along(tmp_path: Path, tiny_data: Path, reference: Path) -> None:
    """kill -9 of the torchrun agent after step 5 (the ranks run in sessions of their own): every rank
    dies with it at once, nothing after step 5 is committed, and the restart continues exactly."""
    fault = 'faults.inject=["signal:step=5:rank=0:sig=SIGKILL:target=launcher"]'
    start = time.monotonic()
    first = _run(tmp_path, tiny_data, [fault], check=False)  # returns once every rank closed the pipes
    assert first.returncode == -signal.SIGKILL and time.monotonic() - start < 120, first.stderr[-3000:]
    run = tmp_path / "run"
    assert not _processes_running_in(run)
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [3]
    assert max(_losses_by_step(run)) == 5
    _run(tmp_path, tiny_data, [fault])
    _assert_matches(run, reference)


def _processes_running_in(run: Path) -> list[int]:
    """Live processes whose command line names the run folder (our ranks: run.name=... run.dir=...)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"run.dir={run.parent}" in (proc / "cmdline").read_text() \
                    and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("rank", [0, 1])
def test_a_checkpoint_one_rank_cannot_see_is_used_by_none(tmp_path: Path, tiny_data: Path, reference: Path,
                                                         rank: int) -> None:
    """After a crash at step 10, step 9's checkpoint is invisible to one rank (a lagging file system
    view): both ranks resume from step 6, and the run still equals the uninterrupted one."""
    faults = f'faults.inject=["crash:step=10:rank=0","hide_checkpoint:step=9:rank={rank}"]'
    assert _run(tmp_path, tiny_data, [faults], check=False).returncode != 0
    assert [c.step for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == [9, 6, 3]
    second = _run(tmp_path, tiny_data, [faults])
    assert "resumed from" in second.stderr and "step_000006 (step 6;" in second.stderr, second.stderr[-3000:]
    if rank == 1:  # rank 0 proposed it, rank 1 could not read it
        assert "skipping checkpoint" in second.stderr and "rank 1: not visible on this rank" in second.stderr
    _assert_matches(tmp_path / "run", reference)


# ---------------------------------------------------------------------------- failing checkpoint writes


@pytest.mark.parametrize("fault", ["fail_save:step=6:rank=1", "fail_save:step=6:rank=0:phase=commit"])
def test_a_failed_async_save_is_reported_everywhere_and_training_goes_on(tmp_path: Path, tiny_data: Path,
                                                                         reference: Path, fault: str) -> None:
    """An I/O error while one rank writes step 6 in the background (or while rank 0 commits it):
    every rank logs it at the next step boundary, ckpt/failed_saves counts it, step 6 is never
    committed, the saves of steps 9 and 12 do not depend on it, and the job exits 0."""
    proc = _run(tmp_path, tiny_data, ["train.async_save=true", f'faults.inject=["{fault}"]'])
    for r in (0, 1):
        assert f"[rank {r}] ERROR asynchronous checkpoint step_000006 failed and was not committed" in proc.stderr
    assert "injected write failure" in proc.stderr
    failed = [r for r in read_metrics(tmp_path / "run") if "ckpt/failed_saves" in r]
    assert [r["ckpt/failed_saves"] for r in failed] == [1.0] and 7 <= failed[0]["step"] <= 8, failed
    ckpts = tmp_path / "run" / "checkpoints"
    assert [c.step for c in list_checkpoints(ckpts)] == [12, 9, 3] and not list(ckpts.glob(".tmp-*"))
    assert all(verify(c) is None for c in list_checkpoints(ckpts))
    _assert_matches(tmp_path / "run", reference)


@pytest.mark.parametrize("faults,step", [(["fail_save:step=12:rank=1"], 12),
                                         (["signal:step=5:rank=1:sig=SIGUSR1", "fail_save:step=5:rank=0"], 5)],
                         ids=["final", "stop-signal"])
def test_a_failed_final_save_never_exits_0_or_75(tmp_path: Path, tiny_data: Path, reference: Path,
                                                 faults: list[str], step: int) -> None:
    """The final checkpoint (or the one a stop signal promises) cannot be written on one rank: every
    rank exits 74 with one line naming the rank and the newest committed checkpoint; a restart of the
    same command resumes from that one and finishes exactly."""
    inject = "faults.inject=[" + ",".join(f'"{f}"' for f in faults) + "]"
    first = _run(tmp_path, tiny_data, [inject], check=False)
    assert first.returncode != 0 and first.stderr.count("exitcode  : 74") == 2, first.stderr[-3000:]
    line = next(x for x in first.stderr.splitlines() if "peer-dist train: error:" in x)
    assert f"step_{step:06d} was not committed: rank {1 if step == 12 else 0}: OSError" in line
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[0]
    assert f"the newest committed checkpoint is {newest.path.name}" in line and newest.step < step
    _run(tmp_path, tiny_data, [inject])  # the faults fired already
    _assert_matches(tmp_path / "run", reference)
