"""One job per run folder: who may take a lease over and who is refused, the heartbeat and a lost
lease, and contenders racing for a free or a stale lease (exactly one wins)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer_dist.train.lease import LEASE_FILE, Holder, RunFolderBusy, RunLease, _pid_start


def _holder(**changes) -> Holder:
    return dataclasses.replace(Holder.this_process(environ={}), **changes)


def _elsewhere(**changes) -> Holder:
    """A holder on another node, alive by its heartbeat."""
    return _holder(host="node7", machine="another-machine", pid=4242, pid_start="99", job="slurm job 99",
                   slurm_job="99", **changes)


def _write(run: Path, holder: Holder) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LEASE_FILE).write_text(json.dumps(dataclasses.asdict(holder)))


def _on_file(run: Path) -> dict:
    return json.loads((run / LEASE_FILE).read_text())


def test_take_and_release(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lease = RunLease.acquire(run, _holder(ranks=[["h", 1], ["h", 2]]))
    held = _on_file(run)
    assert held["pid"] == os.getpid() and held["token"] == lease.holder.token and held["ranks"] == [["h", 1], ["h", 2]]
    assert sorted(p.name for p in run.iterdir()) == [LEASE_FILE]  # no temporary files left
    lease.release()
    assert not (run / LEASE_FILE).exists()


def test_a_live_holder_on_another_node_is_named_and_kept(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run, _elsewhere(heartbeat=time.time() - 5, ranks=[["node7", 4242], ["node8", 77]]))
    before = (run / LEASE_FILE).read_bytes()
    start = time.monotonic()
    with pytest.raises(RunFolderBusy) as info:
        RunLease.acquire(run, _holder())
    assert time.monotonic() - start < 1.0  # another job: refused at once, no waiting
    message = str(info.value)
    assert f"run folder {run} is in use by another job: slurm job 99 (2 ranks, rank 0 on host node7, pid 4242)" \
        in message and "last heartbeat 5 s ago" in message and "pick another run.name" in message
    assert (run / LEASE_FILE).read_bytes() == before


def test_a_stale_heartbeat_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run, _elsewhere(heartbeat=time.time() - 61))
    lease = RunLease.acquire(run, _holder(), stale_after_s=60)
    assert _on_file(run)["token"] == lease.holder.token
    assert [p.name for p in run.iterdir()] == [LEASE_FILE]  # the stale one moved aside and deleted


def test_a_holder_gone_from_this_machine_is_taken_over_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    _write(run, _holder(pid=ended.pid, pid_start="12345", heartbeat=time.time()))
    assert _on_file(run)["pid"] == ended.pid
    RunLease.acquire(run, _holder())
    assert _on_file(run)["pid"] == os.getpid()


def test_a_live_process_on_this_machine_holds_it_unless_its_pid_was_reused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    parent = os.getppid()
    _write(run, _holder(pid=parent, pid_start=_pid_start(parent), heartbeat=time.time()))
    with pytest.raises(RunFolderBusy, match=f"pid {parent}"):
        RunLease.acquire(run, _holder())
    _write(run, _holder(pid=parent, pid_start="1", heartbeat=time.time()))  # same pid, another process
    RunLease.acquire(run, _holder())
    assert _on_file(run)["pid"] == os.getpid()


def test_torchrun_restarts_take_over_their_own_jobs_lease(tmp_path: Path) -> None:
    run = tmp_path / "run"
    parent = os.getppid()  # alive: only the restart rule can let the new attempt in
    old = _holder(pid=parent, pid_start=_pid_start(parent), run_id="r1", attempt=0, heartbeat=time.time())
    _write(run, old)
    with pytest.raises(RunFolderBusy):
        RunLease.acquire(run, _holder(run_id="r1", attempt=0))  # same attempt: another launch with that id
    with pytest.raises(RunFolderBusy):
        RunLease.acquire(run, _holder(run_id="r2", attempt=1))  # another run
    lease = RunLease.acquire(run, _holder(run_id="r1", attempt=1))
    assert _on_file(run)["token"] == lease.holder.token


def test_a_requeued_slurm_job_waits_for_its_previous_allocation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run, _elsewhere(heartbeat=time.time(), slurm_restart=0))
    start = time.monotonic()
    lease = RunLease.acquire(run, _holder(slurm_job="99", slurm_restart=1), stale_after_s=1.0, poll_s=0.05)
    assert 0.9 <= time.monotonic() - start < 5.0  # waited until the old heartbeat was stale
    assert _on_file(run)["token"] == lease.holder.token


def test_heartbeat_refreshes_and_a_takeover_is_noticed(tmp_path: Path) -> None:
    run, lost = tmp_path / "run", []
    lease = RunLease.acquire(run, _holder(), stale_after_s=0.6, on_lost=lost.append).start_heartbeat()
    first = _on_file(run)["heartbeat"]
    time.sleep(0.35)  # about three beats (every 0.1 s)
    assert _on_file(run)["heartbeat"] > first
    _write(run, _elsewhere(heartbeat=time.time()))  # another job took the folder (we were frozen)
    time.sleep(0.3)
    assert len(lost) == 1 and "lost the lease" in lost[0] and "slurm job 99" in lost[0]
    with pytest.raises(RunFolderBusy, match="lost the lease"):
        lease.check()  # before a commit
    lease.release()
    assert _on_file(run)["pid"] == 4242  # not ours to delete


def test_an_unreadable_lease_is_refused_with_what_to_do(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LEASE_FILE).write_text("{not json")
    with pytest.raises(RunFolderBusy, match=f"cannot be read .*delete {run / LEASE_FILE}"):
        RunLease.acquire(run, _holder())


def _contend(run: str, barrier, results) -> None:
    try:
        barrier.wait(timeout=60)
        lease = RunLease.acquire(Path(run), Holder.this_process(environ={}))
        results.put("won")
    except RunFolderBusy:
        lease = None
        results.put("refused")
    barrier.wait(timeout=60)  # every contender has tried before the winner lets go
    if lease is not None:
        lease.release()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_racing_contenders_exactly_one_wins(tmp_path: Path, stale: bool) -> None:
    run = tmp_path / "run"
    if stale:  # every contender finds it stale: one breaks it and takes it, the others see the new one
        _write(run, _elsewhere(heartbeat=time.time() - 3600))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(5), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(run), barrier, results)) for _ in range(5)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert outcomes == ["refused"] * 4 + ["won"]
    assert not (run / LEASE_FILE).exists() and not list(run.iterdir())  # released; nothing left aside


def test_a_lease_deleted_by_hand_is_taken_again_by_its_holder(tmp_path: Path) -> None:
    run, lost = tmp_path / "run", []
    lease = RunLease.acquire(run, _holder(), on_lost=lost.append)
    (run / LEASE_FILE).unlink()
    lease.refresh()
    assert _on_file(run)["token"] == lease.holder.token and not lost
    lease.check()
