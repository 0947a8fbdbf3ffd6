"""Launchers and stop signals: every way of starting the trainer gives the same run.

Reference: one 2-process ``torchrun --standalone`` run of the tiny config. The same
config under ``mpirun -n 2`` (launch/mpirun.sh, no exports), ``sbatch slurm/train.sbatch``
on a real two-node Slurm cluster and launch/torchrun_multinode.sh with two agents must
reproduce its losses and final weights (helpers.assert_same_run,
as in tests/test_train.py). Launcher/world mismatches exit 2 with one message and write
nothing. Stop signals: a signal to ONE rank of a real 2-process gloo group makes both
stop at the same step; under Slurm a signalled or preempted job checkpoints, is
requeued (by the trainer or by the batch script) and resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer_dist.errors import ConfigError, LaunchError
from peer_dist.parallel.env import DistEnv, _check_mpi_world, detect_env, free_port, init_distributed
from peer_dist.train.signals import EXIT_PREEMPTED, PreemptionHandler, parse_signal, requeue_slurm_job
from tests.helpers import ROOT, assert_same_run, run_cli
from tests.slurm_cluster import SlurmCluster, clean_env, slurm_cluster  # noqa: F401  (slurm_cluster: fixture)
from tests.test_train import TINY

CONFIG = "configs/tiny.toml"
VENV = Path(sys.executable).parent.parent
MPIRUN = Path(sys.executable).with_name("mpirun")


def _overrides(data: Path, run_dir: Path, name: str) -> list[str]:
    """TINY at micro-batch 4 per rank (global batch 8 on 2 ranks), into run_dir/name."""
    return [*TINY, "train.micro_batch_size=4", f"data.path={data}", f"run.dir={run_dir}", f"run.name={name}"]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("torchrun")
    run_cli(["train", "--config", CONFIG, *_overrides(tiny_data, tmp, "torchrun")], nproc=2, timeout=300)
    return tmp / "torchrun"


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _require_mpi() -> None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install -e '.[mpi]' installs it with the mpich wheel)")
    if not MPIRUN.exists():
        pytest.skip(f"no mpirun next to {sys.executable} (the `mpich` wheel of the [mpi] extra provides it)")


# ---------------------------------------------------------------- environment detection


@pytest.mark.parametrize("environ, expected", [
    ({}, DistEnv(0, 1, 0, "single")),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, DistEnv(1, 4, 1, "torchrun")),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}, DistEnv(3, 4, 1, "slurm")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, DistEnv(1, 2, 1, "mpich")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     DistEnv(2, 3, 0, "openmpi")),
    # torchrun inside an sbatch allocation: torchrun's variables, not the batch step's.
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     DistEnv(1, 2, 0, "torchrun")),
    # mpirun inside an sbatch allocation: ranks inherit SLURM_PROCID=0 of the batch step.
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, DistEnv(1, 2, 0, "mpich")),
    # srun --mpi=pmi2 sets both, consistently.
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"},
     DistEnv(1, 2, 0, "mpich")),
])
def test_detect_env(environ: dict[str, str], expected: DistEnv) -> None:
    assert detect_env(environ) == expected


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "torchrun: RANK/WORLD_SIZE/LOCAL_RANK must be integers"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, "slurm: SLURM_PROCID=2 is outside 0..1 (SLURM_NTASKS=2)"),
    ({"PMI_RANK": "-1", "PMI_SIZE": "2"}, "mpich: PMI_RANK=-1 is outside 0..1 (PMI_SIZE=2)"),
])
def test_detect_env_rejects_bad_values(environ: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        detect_env(environ)


def test_mpi_world_mismatch_message_names_both_sizes_and_the_fix() -> None:
    with pytest.raises(LaunchError) as err:
        _check_mpi_world(DistEnv(0, 2, 0, "mpich"), mpi_size=1, mpi_rank=0, library="MPICH Version: 5.0.2")
    msg = str(err.value)
    assert "PMI_SIZE=2" in msg and "COMM_WORLD has 1" in msg and "srun --mpi=pmi2" in msg and "mpirun" in msg
    with pytest.raises(LaunchError, match="OMPI_COMM_WORLD_RANK=1 but this process is MPI rank 0"):
        _check_mpi_world(DistEnv(1, 2, 0, "openmpi"), mpi_size=2, mpi_rank=0, library="Open MPI v5")
    _check_mpi_world(DistEnv(1, 2, 0, "mpich"), mpi_size=2, mpi_rank=1, library="MPICH")  # consistent: no error


def _launcher_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    """Set (and restore afterwards) every variable init_distributed reads or writes."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    for var, value in values.items():
        monkeypatch.setenv(var, value)


def test_slurm_without_master_address_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _launcher_env(monkeypatch)
    with pytest.raises(LaunchError, match="launched by slurm .world size 2. but MASTER_ADDR/MASTER_PORT are not set"):
        init_distributed(DistEnv(1, 2, 0, "slurm"), "gloo")


@pytest.mark.timeout(60)
def test_missing_ranks_fail_the_rendezvous_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 1 of 2 and nobody at MASTER_ADDR:MASTER_PORT: a bounded wait, then one message.
    port = free_port()
    _launcher_env(monkeypatch, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with pytest.raises(LaunchError, match=f"rank 1 of 2 .slurm. could not form the process group at 127.0.0.1:{port}"):
        init_distributed(DistEnv(1, 2, 0, "slurm"), "gloo", timeout_s=2)


# ---------------------------------------------------------------- stop signals, one process


def test_parse_signal() -> None:
    assert parse_signal("SIGTERM") == parse_signal("term") == parse_signal(int(signal.SIGTERM)) == signal.SIGTERM
    assert parse_signal("USR1") == signal.SIGUSR1
    with pytest.raises(ConfigError, match="unknown signal 'SIGFOO'"):
        parse_signal("SIGFOO")
    with pytest.raises(ConfigError, match="SIGKILL cannot be caught"):
        parse_signal("KILL")


def test_handler_records_a_real_signal_and_restores_previous_handlers() -> None:
    seen: list[int] = []

    def previous(signum: int, frame: object) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with PreemptionHandler(["SIGUSR1", "SIGUSR2"]) as handler:
            assert not handler.stop_requested()  # no process group: this process's own flag
            os.kill(os.getpid(), signal.SIGUSR2)
            assert handler.local_request and handler.received == signal.SIGUSR2
            os.kill(os.getpid(), signal.SIGUSR1)
            assert handler.received == signal.SIGUSR2  # the first signal is the one reported
            assert handler.stop_requested() and seen == []  # ours, not the previous handler
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_switch_to_hands_back_dropped_signals_and_redelivers_one_that_came() -> None:
    seen: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGHUP)}  # an earlier test's, or default
    try:
        handler = PreemptionHandler(["SIGUSR1", "SIGUSR2"]).install()
        os.kill(os.getpid(), signal.SIGUSR2)  # arrives before the config's set is known
        assert handler.received == signal.SIGUSR2 and seen == []
        handler.switch_to(["SIGUSR1", "SIGHUP"])  # the config: SIGUSR2 is no stop signal, SIGHUP is
        assert seen == [signal.SIGUSR2]  # delivered again, to the handler it would have reached
        assert handler.received is None and not handler.stop_requested()
        os.kill(os.getpid(), signal.SIGHUP)  # installed by the switch: recorded, not the default (terminate)
        assert handler.received == signal.SIGHUP and handler.stop_requested()
        handler.close()
        assert {sig: signal.getsignal(sig) for sig in before} == before  # both handed back as they were
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_exit_code_is_distinct_and_matches_the_sbatch_template() -> None:
    from peer_dist.errors import EXIT_USER_ERROR

    assert EXIT_PREEMPTED not in (0, 1, EXIT_USER_ERROR) and EXIT_PREEMPTED < 128  # not a "killed by signal"
    assert f"EXIT_PREEMPTED={EXIT_PREEMPTED}" in (ROOT / "slurm" / "train.sbatch").read_text()


def test_requeue_slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert requeue_slurm_job(environ={}) is False  # not under Slurm: nothing to do
    calls = tmp_path / "calls"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit "${{FAKE_RC:-0}}"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert requeue_slurm_job(environ={"SLURM_JOB_ID": "42"}) is True
    monkeypatch.setenv("FAKE_RC", "1")
    assert requeue_slurm_job(environ={"SLURM_JOB_ID": "43"}) is False
    assert calls.read_text().splitlines() == ["requeue 42", "requeue 43"]


# ---------------------------------------------------------------- stop signals, two real ranks

_SIGNAL_WORKER = r"""
import datetime, json, os, signal, sys, time
import torch.distributed as dist
from peer_dist.train.signals import EXIT_PREEMPTED, PreemptionHandler

rank, out = int(os.environ["RANK"]), sys.argv[1]
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
handler = PreemptionHandler(["SIGTERM", "SIGUSR1"]).install()
step, max_steps = 0, 3000  # 3000 x 50 ms: the test ends long before
while step < max_steps:
    time.sleep(0.05)
    dist.barrier()  # stands in for a training step's collectives
    step += 1
    with open(f"{out}/progress-{rank}.tmp", "w") as f:
        f.write(str(step))
    os.replace(f"{out}/progress-{rank}.tmp", f"{out}/progress-{rank}")
    if handler.stop_requested():
        break
handler.close()
restored = all(signal.getsignal(s) is signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGUSR1))
with open(f"{out}/result-{rank}.json", "w") as f:
    json.dump({"step": step, "received": handler.received.name if handler.received else None,
               "restored": restored}, f)
dist.destroy_process_group()
sys.exit(EXIT_PREEMPTED if step < max_steps else 1)
"""


def _progress(out: Path, rank: int) -> int:
    try:
        return int((out / f"progress-{rank}").read_text())
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig, target", [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)])
def test_signal_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path: Path, sig: signal.Signals,
                                                             target: int) -> None:
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _SIGNAL_WORKER, str(tmp_path)], cwd=ROOT,
                              env=clean_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for r in range(2)]
    try:
        deadline = time.monotonic() + 60
        while min(_progress(tmp_path, r) for r in range(2)) < 3:  # both ranks are stepping
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate(timeout=5)[0] for p in procs if p.poll() is not None]
            time.sleep(0.05)
        os.kill(procs[target].pid, sig)
        outputs = [p.communicate(timeout=60)[0].decode() for p in procs]
    finally:
        for p in procs:  # only on failure are they still running
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, outputs
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2)]
    assert results[0]["step"] == results[1]["step"] >= 3  # one decision, taken at the same step
    assert results[target]["received"] == sig.name and results[1 - target]["received"] is None
    assert all(r["restored"] for r in results)


# ---------------------------------------------------------------- mpirun (mpi4py)


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("preset", [{}, {"MASTER_PORT": "23456"}])
def test_mpirun_ranks_share_rank0_address_and_port(tmp_path: Path, preset: dict[str, str]) -> None:
    _require_mpi()
    code = ("import json, os, sys; from peer_dist.parallel import env as e; d = e.detect_env(); e._mpi_rendezvous(d); "
            "row = [d.launcher, d.rank, d.world, os.environ['MASTER_ADDR'], os.environ['MASTER_PORT']]; "
            "open(f'{sys.argv[1]}/rank{d.rank}.json', 'w').write(json.dumps(row))")
    proc = _run([str(MPIRUN), "-n", "2", sys.executable, "-c", code, str(tmp_path)], clean_env(**preset), timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r[:3] for r in rows] == [["mpich", 0, 2], ["mpich", 1, 2]]
    assert rows[0][3:] == rows[1][3:] and rows[0][3] == "127.0.0.1"  # one host: loopback
    assert rows[0][4] == preset.get("MASTER_PORT", rows[0][4])


@pytest.mark.mpi
@pytest.mark.timeout(400)
def test_mpirun_equals_torchrun(tmp_path: Path, tiny_data: Path, torchrun_run: Path) -> None:
    _require_mpi()
    # No MASTER_ADDR/MASTER_PORT anywhere: rank 0 picks them and broadcasts them over MPI.
    proc = _run(["bash", "launch/mpirun.sh", *_overrides(tiny_data, tmp_path, "mpirun")],
                clean_env(NPROC="2", PEER_DIST_VENV=str(VENV), MPIRUN=str(MPIRUN)))
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert_same_run(tmp_path / "mpirun", torchrun_run)


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher_vars, world_var", [
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "PMI_SIZE"),  # MPICH variables, but no mpirun behind them
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE"),  # another MPI's mpirun
])
def test_launcher_and_mpi_world_mismatch_is_a_clear_error(tmp_path: Path, tiny_data: Path,
                                                          launcher_vars: dict[str, str], world_var: str) -> None:
    _require_mpi()
    proc = _run([sys.executable, "-m", "peer_dist.cli", "train", "--config", CONFIG,
                 *_overrides(tiny_data, tmp_path, "bad")], clean_env(**launcher_vars), timeout=100)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"{world_var}=2 says the job has 2 processes, but MPI's COMM_WORLD has 1" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- torchrun multi-node script


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_multinode_script_with_two_agents_equals_torchrun(tmp_path: Path, tiny_data: Path,
                                                                   torchrun_run: Path) -> None:
    # Two "nodes" on this machine: two torchrun agents with one worker each meet in the c10d
    # rendezvous that node 0 hosts.
    common = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                  RDZV_ID=f"test-{os.getpid()}", PEER_DIST_VENV=str(VENV), JOIN_TIMEOUT="120")
    cmd = ["bash", "launch/torchrun_multinode.sh", *_overrides(tiny_data, tmp_path, "multinode")]
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=clean_env(NODE_RANK=str(n), **common), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True) for n in range(2)]
    try:
        outputs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert_same_run(tmp_path / "multinode", torchrun_run)


# ---------------------------------------------------------------- a real Slurm cluster


def _sbatch(cluster: SlurmCluster, *args: str, **env: str) -> str:
    out = cluster.run("sbatch", "--parsable", *args, env=cluster.env(**env)).stdout
    return out.strip().split(";")[0]


@pytest.mark.slurm
@pytest.mark.timeout(500)
def test_sbatch_two_nodes_equals_torchrun(tmp_path: Path, tiny_data: Path, torchrun_run: Path,
                                          slurm_cluster: SlurmCluster) -> None:
    job = _sbatch(slurm_cluster, f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch",
                  *_overrides(tiny_data, tmp_path, "sbatch"), PYTHON=sys.executable)
    info = slurm_cluster.wait_job(job, timeout=300)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert info["NodeList"] == "n[1-2]" and info["NumTasks"] == "2"
    assert_same_run(tmp_path / "sbatch", torchrun_run)


@pytest.mark.slurm
@pytest.mark.timeout(200)
def test_srun_without_pmi_is_a_clear_error(tmp_path: Path, tiny_data: Path, slurm_cluster: SlurmCluster) -> None:
    # Tasks that carry PMI variables (as an MPI-aware launch does) but srun runs without
    # --mpi=pmi2: MPICH cannot reach a process manager and every task is an MPI world of 1.
    wrapper = 'PMI_RANK=$SLURM_PROCID PMI_SIZE=$SLURM_NTASKS exec "$@"'
    proc = slurm_cluster.run("srun", "--mpi=none", "--nodes=2", "--ntasks=2", "bash", "-c", wrapper, "wrap",
                             sys.executable, "-m", "peer_dist.cli", "train", "--config", CONFIG,
                             *_overrides(tiny_data, tmp_path, "bad"), timeout=150, check=False)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = {line for line in proc.stderr.splitlines() if line.startswith("peer-dist train: error:")}
    assert len(errors) == 1, proc.stderr  # both ranks say the same one thing
    assert "PMI_SIZE=2 says the job has 2 processes, but MPI's COMM_WORLD has 1" in errors.pop()
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()


# A stand-in for `python -m peer_dist.cli train` that stops the way the trainer is meant to
# (peer_dist/train/signals.py), so the batch script's signal/requeue path runs for real:
# steps with a collective, agree on a stop, "checkpoint" the step, maybe requeue, exit 75;
# a requeued attempt resumes from the checkpoint and finishes 3 steps later.
_TRAINER_STUB = r"""
import datetime, json, os, sys, time
from pathlib import Path
import torch.distributed as dist
from peer_dist.parallel.env import detect_env
from peer_dist.train.signals import EXIT_PREEMPTED, PreemptionHandler, requeue_slurm_job

args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
run = Path(args["run.dir"]) / args["run.name"]
run.mkdir(parents=True, exist_ok=True)
env = detect_env()
attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
dist.init_process_group("gloo", rank=env.rank, world_size=env.world, timeout=datetime.timedelta(seconds=60))
ckpt = run / "checkpoint.json"
step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
end = step + 3 if attempt else 10**6

def note(**kw):
    with (run / f"rank{env.rank}.jsonl").open("a") as f:
        f.write(json.dumps(dict(attempt=attempt, launcher=env.launcher, **kw)) + "\n")

note(event="start", step=step)
with PreemptionHandler() as stop:
    (run / f"ready-{attempt}-{env.rank}").touch()
    while step < end:
        time.sleep(0.1)
        dist.barrier()
        step += 1
        if stop.stop_requested():
            note(event="stop", step=step, signal=stop.received.name if stop.received else None)
            if env.rank == 0:
                ckpt.write_text(json.dumps({"step": step}))
            dist.barrier()  # the checkpoint is committed before anyone requeues or exits
            if env.rank == 0 and args.get("requeue") == "trainer":
                note(event="requeue", ok=requeue_slurm_job())
            dist.destroy_process_group()
            sys.exit(EXIT_PREEMPTED)
note(event="done", step=step)
dist.destroy_process_group()
"""


@pytest.mark.slurm
@pytest.mark.timeout(400)
@pytest.mark.parametrize("requeue, stop", [("trainer", "time-limit-signal"), ("script", "preemption")])
def test_stopped_job_checkpoints_is_requeued_and_resumes(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                          requeue: str, stop: str) -> None:
    stub = tmp_path / "trainer_stub.py"
    stub.write_text(_TRAINER_STUB)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{stub}" "$@"\n')
    python.chmod(0o755)
    run = tmp_path / "stub"
    job = _sbatch(slurm_cluster, f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch",
                  f"run.dir={tmp_path}", f"requeue={requeue}", PYTHON=str(python), RUN_NAME="stub")
    deadline = time.monotonic() + 120
    while not all((run / f"ready-0-{r}").exists() for r in range(2)):
        assert time.monotonic() < deadline, f"{slurm_cluster.job(job)}\n{slurm_cluster.logs()}"
        time.sleep(0.5)
    if stop == "time-limit-signal":  # what --signal=USR1@120 does before the time limit: USR1 to the ranks
        slurm_cluster.run("scancel", "--signal=USR1", job)
    else:  # a job in the higher-priority partition needs both nodes: Slurm preempts ours
        high = _sbatch(slurm_cluster, "--partition=high", "--nodes=2", "--output=/dev/null", "--wrap=sleep 1")
    info = slurm_cluster.wait_job(job, timeout=240)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert log.count(f"job {job} attempt ") == 2 and f"job {job} attempt 2 " in log  # appended, not truncated
    # --signal and preempt_send_user_signal send SIGUSR1; preemption and requeue also SIGTERM.
    signals = {"SIGUSR1"} if stop == "time-limit-signal" else {"SIGUSR1", "SIGTERM"}
    stop_steps = set()
    for rank in range(2):
        events = [json.loads(line) for line in (run / f"rank{rank}.jsonl").read_text().splitlines()]
        stops = [e for e in events if e["event"] == "stop"]
        assert len(stops) == 1 and stops[0]["attempt"] == 0 and stops[0]["signal"] in signals, events
        stop_steps.add(stops[0]["step"])
        # The second attempt resumed from the checkpointed step and finished.
        assert events[-2] == {"attempt": 1, "launcher": "slurm", "event": "start", "step": stops[0]["step"]}
        assert events[-1] == {"attempt": 1, "launcher": "slurm", "event": "done", "step": stops[0]["step"] + 3}
    assert len(stop_steps) == 1  # both ranks stopped at the same step
    assert [json.loads(line) for line in (run / "rank0.jsonl").read_text().splitlines()
            if '"requeue"' in line] == ([{"attempt": 0, "launcher": "slurm", "event": "requeue", "ok": True}]
                                        if requeue == "trainer" else [])
    if stop == "preemption":
        assert slurm_cluster.wait_job(high, timeout=60)["JobState"] == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.timeout(200)
@pytest.mark.parametrize("exit_code, state", [(0, "COMPLETED"), (EXIT_PREEMPTED, "FAILED")])
def test_preempted_job_that_exits_is_not_requeued_by_slurm(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                           exit_code: int, state: str) -> None:
    # Why slurm/train.sbatch requeues explicitly: a preempted --requeue job that ends by itself
    # within GraceTime keeps its end state, whatever its exit code.
    ready = tmp_path / "ready"
    task = f'trap "exit {exit_code}" USR1 TERM; touch {ready}; sleep 300 & wait'
    job = _sbatch(slurm_cluster, "--requeue", "--nodes=2", "--signal=USR1@60", "--output=/dev/null",
                  f"--wrap=srun bash -c '{task}'; exit {exit_code}")
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, slurm_cluster.job(job)
        time.sleep(0.5)
    high = _sbatch(slurm_cluster, "--partition=high", "--nodes=2", "--output=/dev/null", "--wrap=sleep 1")
    assert slurm_cluster.wait_job(high, timeout=120)["JobState"] == "COMPLETED"
    info = slurm_cluster.wait_job(job, timeout=60)
    assert info["JobState"] == state and info["Restarts"] == "0" and info["ExitCode"] == f"{exit_code}:0"


@pytest.mark.slurm
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stop", ["time-limit-signal", "preemption"])
def test_trainer_under_slurm_is_stopped_requeued_and_resumes_exactly(tmp_path: Path, tiny_data: Path,
                                                                     slurm_cluster: SlurmCluster, stop: str) -> None:
    """The real trainer in slurm/train.sbatch: a stop (SIGUSR1 before the time limit, or preemption
    by the high-priority partition) -> checkpoint at the agreed step -> requeue -> the requeued job
    resumes and finishes; losses and weights equal an uninterrupted 2-rank run."""
    from tests.test_resume import COMMON, _assert_matches

    # Every rank pauses 20 s in step 4 so the stop reliably arrives mid-run; the pause fires once
    # per run folder, so the requeued attempt does not pause again.
    overrides = [*COMMON, "train.micro_batch_size=4", f"data.path={tiny_data}", f"run.dir={tmp_path}"]
    run_cli(["train", *overrides, "run.name=ref"], nproc=2, timeout=280)
    job = _sbatch(slurm_cluster, f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch", *overrides,
                  'faults.inject=["hang:step=4:seconds=20"]', PYTHON=sys.executable, RUN_NAME="pre")
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and any('"step": 3,' in line for line in metrics.read_text().splitlines())):
        assert time.monotonic() < deadline, f"{slurm_cluster.job(job)}\n{slurm_cluster.logs()}"
        time.sleep(0.3)
    if stop == "time-limit-signal":
        slurm_cluster.run("scancel", "--signal=USR1", job)
    else:
        high = _sbatch(slurm_cluster, "--partition=high", "--nodes=2", "--output=/dev/null", "--wrap=sleep 1")
    info = slurm_cluster.wait_job(job, timeout=400)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-6000:]
    assert "stopped on a signal at step 4" in log and "resumed from" in log and "step_000004" in log
    _assert_matches(tmp_path / "pre", tmp_path / "ref")
    if stop == "preemption":
        assert slurm_cluster.wait_job(high, timeout=60)["JobState"] == "COMPLETED"
