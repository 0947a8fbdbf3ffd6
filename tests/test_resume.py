"""Interrupted runs resume exactly: a stop signal or kill -9 at a step, a restart of the same
command, and the loss sequence and final weights equal an uninterrupted run's.

Equal losses at every step after the restart also mean the data continued exactly: a
repeated or skipped batch would change them.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peer_dist.errors import EXIT_USER_ERROR
from tests.helpers import ROOT, TORCHRUN, _env, final_weights, run_cli
from tests.test_train import TINY

STEPS = 12
COMMON = [*TINY, f"train.max_steps={STEPS}", "train.ckpt_interval=3", "train.eval_interval=0"]


def _args(data: Path, tmp: Path, name: str, extra: list[str]) -> list[str]:
    return ["train", *COMMON, f"data.path={data}", f"run.dir={tmp}", f"run.name={name}", *extra]


def _losses_by_step(run: Path) -> dict[int, float]:
    """Step -> training loss; a step logged again after a restart keeps its last value."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def _start(args: list[str], nproc: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "peer_dist.cli", *args] if nproc == 1 else \
        [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", "-m", "peer_dist.cli", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and max(_losses_by_step(run), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"run did not reach step {step} in {timeout}s")


def _interrupt(tmp: Path, data: Path, extra: list[str], nproc: int, how: str, at_step: int,
               signalled_rank: int = 0) -> tuple[Path, subprocess.CompletedProcess]:
    """Start a run, interrupt it once it logged ``at_step``; returns the run folder and how it ended.

    Rank 0 stalls for 5 s right after logging ``at_step`` (an injected hang), so the
    interruption lands while steps remain: a fast run could otherwise finish its last
    steps before the signal arrives, and there would be nothing to resume.
    """
    run = tmp / "interrupted"
    if not any(word.startswith("faults.inject=") for word in extra):
        extra = [*extra, f'faults.inject=["hang:step={at_step}:rank=0:seconds=5"]']
    proc = _start(_args(data, tmp, "interrupted", extra), nproc)
    _wait_for_step(run, at_step, proc)
    if how == "kill9":
        ranks = [proc.pid] if nproc == 1 else _worker_pids(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's process group, no chance to clean up
        # torchrun starts every worker in a session of its own, out of that group: they must die
        # with their launcher, or they train on and commit checkpoints while the restart begins.
        _assert_gone(ranks)
        assert max(_losses_by_step(run)) < STEPS  # steps are left to resume
    else:
        target = proc.pid if nproc == 1 else _worker_pids(proc.pid)[signalled_rank]
        sig = {"sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1, "sigint": signal.SIGINT,
               "sigint2": signal.SIGINT}[how]
        os.kill(target, sig)
        if how == "sigint2":  # Ctrl-C twice (the run hangs after at_step: the second one finds it busy)
            time.sleep(1.0)
            os.kill(target, sig)
    out, err = proc.communicate(timeout=240)
    return run, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _resume(tmp: Path, data: Path, extra: list[str], nproc: int) -> subprocess.CompletedProcess:
    return run_cli(_args(data, tmp, "interrupted", extra), nproc=nproc, timeout=280)  # the same command again


def _first_step(proc: subprocess.CompletedProcess) -> int:
    """The step a run started from (its "steps N..M" log line): the resumed checkpoint's, or 0."""
    return int(re.search(r"steps (\d+)\.\.\d+", proc.stderr).group(1))


def _assert_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Every process in ``pids`` ends within ``timeout`` (a zombie counts as ended: it runs no code)."""
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"rank processes {alive} outlived their launcher by {timeout:g} s"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _stopped_step(run: Path, first: subprocess.CompletedProcess) -> int:
    """The step a signalled run stopped at; its checkpoint must be committed and intact."""
    from peer_dist.checkpoint.store import resolve_checkpoint

    stopped = int(first.stdout.split("stopped on a signal at step ")[1].split(":")[0])
    assert resolve_checkpoint(run / "checkpoints" / f"step_{stopped:06d}").step == stopped
    return stopped


def _worker_pids(agent_pid: int) -> list[int]:
    """torchrun's worker processes, by local rank (their command lines are identical; pid order = spawn order)."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return sorted(int(c) for c in children)


def _assert_matches(run: Path, reference: Path) -> None:
    ref, got = _losses_by_step(reference), _losses_by_step(run)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([got[s] for s in ref]), torch.tensor(list(ref.values())),
                               rtol=1e-6, atol=0)
    ref_w, w = final_weights(reference), final_weights(run)
    for name in ref_w:
        torch.testing.assert_close(w[name], ref_w[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    runs = {}
    for key, extra, nproc in (("one", ["train.micro_batch_size=8"], 1),):
        run_cli(_args(tiny_data, tmp, key, extra), nproc=nproc, timeout=280)
        runs[key] = tmp / key
    return runs


@pytest.mark.timeout(400)
def test_sigterm_checkpoints_exits_75_and_resumes_exactly(tmp_path: Path, tiny_data: Path,
                                                          uninterrupted: dict[str, Path]) -> None:
    extra = ["train.micro_batch_size=8"]
    run, first = _interrupt(tmp_path, tiny_data, extra, 1, "sigterm", at_step=4)
    assert first.returncode == 75, first.stderr[-3000:]
    assert 4 <= _stopped_step(run, first) < STEPS  # the finished step, not the last interval checkpoint
    _resume(tmp_path, tiny_data, extra, 1)
    _assert_matches(run, uninterrupted["one"])


@pytest.mark.timeout(400)
def test_ctrl_c_checkpoints_exits_75_and_resumes_exactly(tmp_path: Path, tiny_data: Path,
                                                         uninterrupted: dict[str, Path]) -> None:
    extra = ["train.micro_batch_size=8"]
    run, first = _interrupt(tmp_path, tiny_data, extra, 1, "sigint", at_step=4)
    assert first.returncode == 75, first.stderr[-3000:]
    assert "Traceback" not in first.stderr and "KeyboardInterrupt" not in first.stderr
    assert "Ctrl-C: finishing the step and writing a checkpoint" in first.stderr
    assert 4 <= _stopped_step(run, first) < STEPS
    _resume(tmp_path, tiny_data, extra, 1)
    _assert_matches(run, uninterrupted["one"])


# Runs `peer-dist train ARGS...` with a SIGTERM sent to itself at a point of start-up: while
# the config loads (before the config's stop signals are in place) or while DeepSpeed builds
# the engine (set-up). Only the signal's timing is arranged; everything else is the real command.
_SIGNAL_DURING_START_UP = r"""
import os, signal, sys
import peer_dist.config, peer_dist.train.trainer as trainer

def signalled(real):
    def call(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    return call

if sys.argv[1] == "config":
    peer_dist.config.load_config = signalled(peer_dist.config.load_config)
else:
    trainer.build_engine = signalled(trainer.build_engine)
from peer_dist.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _signal_during_start_up(where: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SIGNAL_DURING_START_UP, where, *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("where", ["config", "engine"])
def test_sigterm_during_start_up_is_kept_and_the_run_stops_after_one_step(
        tmp_path: Path, tiny_data: Path, uninterrupted: dict[str, Path], where: str) -> None:
    extra = ["train.micro_batch_size=8"]
    first = _signal_during_start_up(where, _args(tiny_data, tmp_path, "interrupted", extra))
    # without the early handler the default action would end the process: returncode -15, no checkpoint
    assert first.returncode == 75, first.stderr[-3000:]
    assert "stop requested (got SIGTERM)" in first.stderr
    run = tmp_path / "interrupted"
    assert _stopped_step(run, first) == 1 and max(_losses_by_step(run)) == 1  # steps are left to resume
    assert _first_step(_resume(tmp_path, tiny_data, extra, 1)) == 1
    _assert_matches(run, uninterrupted["one"])


@pytest.mark.timeout(200)
def test_sigterm_during_start_up_terminates_when_it_is_not_a_stop_signal(tmp_path: Path, tiny_data: Path) -> None:
    args = _args(tiny_data, tmp_path, "run", ["train.micro_batch_size=8", 'train.stop_signals=["SIGUSR1"]'])
    first = _signal_during_start_up("config", args)
    assert first.returncode == -signal.SIGTERM, first.stderr[-3000:]  # its default action, as configured
    assert not (tmp_path / "run").exists()  # it ended before set-up: nothing was written


@pytest.mark.timeout(400)
def test_second_ctrl_c_aborts_at_once_and_keeps_the_last_checkpoint(tmp_path: Path, tiny_data: Path,
                                                                    uninterrupted: dict[str, Path]) -> None:
    from peer_dist.checkpoint.store import list_checkpoints, verify

    extra = ["train.micro_batch_size=8"]
    # A 60 s stall after step 4 (as a slow save or a stuck filesystem would): the first Ctrl-C is
    # recorded, the second one ends the process at once instead of waiting for the step to finish.
    run, first = _interrupt(tmp_path, tiny_data, [*extra, 'faults.inject=["hang:step=4:seconds=60"]'], 1,
                            "sigint2", at_step=4)
    assert first.returncode == 130, first.stderr[-3000:]
    assert "second Ctrl-C: aborting now" in first.stderr and "Traceback" not in first.stderr
    assert "stopped on a signal" not in first.stdout  # no checkpoint of its own: it left at once
    ckpts = list_checkpoints(run / "checkpoints")
    assert ckpts and all(verify(c) is None for c in ckpts)  # step 3 (at least) committed and intact
    assert max(_losses_by_step(run)) == 4  # it never got past the stalled step: something is left to resume
    _resume(tmp_path, tiny_data, extra, 1)
    _assert_matches(run, uninterrupted["one"])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_resumes_exactly_from_the_last_checkpoint(tmp_path: Path, tiny_data: Path,
                                                        uninterrupted: dict[str, Path], workers: int) -> None:
    extra = ["train.micro_batch_size=8", f"data.num_workers={workers}"]
    at_step = random.randint(2, STEPS - 2)  # a random step: before, at or between checkpoints (every 3)
    run, first = _interrupt(tmp_path, tiny_data, extra, 1, "kill9", at_step=at_step)
    assert first.returncode == -signal.SIGKILL
    assert _first_step(_resume(tmp_path, tiny_data, extra, 1)) <= at_step
    _assert_matches(run, uninterrupted["one"])
    _assert_logged_once(run)


@pytest.mark.timeout(400)
def test_a_second_job_on_the_same_run_folder_is_refused(tmp_path: Path, tiny_data: Path,
                                                        uninterrupted: dict[str, Path]) -> None:
    """While a job trains, the same command again (a restart, a requeue racing the old allocation)
    stops at once with one line naming the holder, and changes nothing. Once the holder is killed,
    its lease is stale: the next start takes it over and continues exactly."""
    extra = ["train.micro_batch_size=8"]
    run = tmp_path / "interrupted"
    holder = _start(_args(tiny_data, tmp_path, "interrupted", [*extra, 'faults.inject=["hang:step=2:seconds=120"]']),
                    1)
    try:
        _wait_for_step(run, 2, holder)
        config_written, metrics = (run / "config.toml").stat().st_mtime_ns, (run / "metrics.jsonl").read_bytes()
        second = run_cli(_args(tiny_data, tmp_path, "interrupted", extra), check=False, timeout=200)
        assert second.returncode == EXIT_USER_ERROR, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"run folder {run} is in use by another job" in errors[0] and f"pid {holder.pid}" in errors[0]
        assert (run / "config.toml").stat().st_mtime_ns == config_written
        assert (run / "metrics.jsonl").read_bytes() == metrics
        assert holder.poll() is None  # the holder trains on
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.communicate(timeout=60)
    third = _resume(tmp_path, tiny_data, extra, 1)
    assert "run folder lease of a job" in third.stderr and "is gone" in third.stderr
    _assert_matches(run, uninterrupted["one"])


def _assert_logged_once(run: Path) -> None:
    """Every step's training loss appears once in metrics.jsonl and in TensorBoard: the steps an
    interrupted process had logged after its last checkpoint were dropped when they were trained again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, STEPS + 1))
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))


TWO_RANK = {"dp2": ["train.micro_batch_size=4"], "ep2": ["train.micro_batch_size=4", "parallel.ep=2"]}


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("uninterrupted2")
    for key, extra in TWO_RANK.items():
        run_cli(_args(tiny_data, tmp, key, extra), nproc=2, timeout=280)
    return {key: tmp / key for key in TWO_RANK}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", sorted(TWO_RANK))
@pytest.mark.parametrize("how", ["sigusr1", "kill9"])
def test_two_ranks_resume_exactly(tmp_path: Path, tiny_data: Path, uninterrupted_two_ranks: dict[str, Path],
                                  layout: str, how: str) -> None:
    """SIGUSR1 to rank 1 only: both ranks stop at the same step with a checkpoint. kill -9 of the
    launcher's process group: every rank dies with it, and the restart falls back to the last interval
    checkpoint with steps left to train. Either way the run continues exactly."""
    run, first = _interrupt(tmp_path, tiny_data, TWO_RANK[layout], 2, how, at_step=random.randint(2, STEPS - 2),
                            signalled_rank=1)
    if how == "sigusr1":
        # torchrun reports the first worker that exited (75) and stops the other once it is done.
        assert first.returncode != 0 and "exitcode  : 75" in first.stderr, first.stderr[-3000:]
        _stopped_step(run, first)  # the step both ranks agreed on, committed by both
    restart = _resume(tmp_path, tiny_data, TWO_RANK[layout], 2)
    assert _first_step(restart) < STEPS  # it resumed something: the interrupted run had not finished
    _assert_matches(run, uninterrupted_two_ranks[layout])


@pytest.mark.timeout(300)
def test_moe_run_resumes_exactly_from_an_interval_checkpoint(tmp_path: Path, tiny_data: Path) -> None:
    """An MoE model (dense-updated 3-D expert weights) resumes from a mid-run checkpoint to the
    uninterrupted run's losses and weights, and a finished one validates again without training."""
    import shutil

    moe = ["model.ffn=moe", "model.moe.num_experts=4", "model.moe.topk=2", "train.max_steps=6", "train.ckpt_interval=3"]
    run_cli(_args(tiny_data, tmp_path, "whole", moe))
    whole = tmp_path / "whole"
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    for path in (resumed / "checkpoints").glob("latest*"):
        path.unlink()
    (resumed / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (resumed / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3))
    proc = run_cli(_args(tiny_data, tmp_path, "resumed", moe))
    assert _first_step(proc) == 3  # there were 3 steps left to train
    assert _losses_by_step(resumed) == pytest.approx(_losses_by_step(whole), rel=1e-5)
    expected, got = final_weights(whole), final_weights(resumed)
    assert expected.keys() == got.keys() and "blocks.1.ffn.experts.w_in" in got
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    again = run_cli(_args(tiny_data, tmp_path, "resumed", [*moe, "train.eval_batches=3"]))
    assert _first_step(again) == 6  # finished: validated again, nothing trained
    after = final_weights(resumed)
    assert all(torch.equal(after[k], got[k]) for k in got)
