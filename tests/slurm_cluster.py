"""A real, private Slurm cluster on this one machine, for the launcher tests.

What runs (docs/testing.md, Slurm): one ``munged`` (as user munge, on its own socket and key), one
``slurmctld`` and two ``slurmd`` (``-N n1``/``-N n2``), each in the foreground (``-D``)
as a child of the test process, all reading one ``slurm.conf`` written into a fresh
temporary folder. Two emulated nodes with ``CPUs=1`` each (this machine has 2 cores).
Partitions: ``low`` (default, PriorityTier=1, preemptable by requeue with a grace time)
and ``high`` (PriorityTier=2), for preemption scenarios.

The session fixture :func:`slurm_cluster` installs the packages when missing and allowed
(launch/install_slurm.sh: root + apt-get), starts everything, waits until ``sinfo``
shows both nodes idle, and on teardown cancels every job, waits for them to end and
kills the daemons it started (by their process ids; should the test process itself be
killed, the kernel sends them SIGTERM: PR_SET_PDEATHSIG). If Slurm cannot be installed the
slurm tests are skipped with the reason; any other start-up failure is an error that
shows the daemons' logs.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODES = ("n1", "n2")
START_TIMEOUT_S = 60.0

_CONF = """\
# Written by tests/slurm_cluster.py for one test session (docs/testing.md).
ClusterName=peerdist-test
# Job ids (and so slurm/train.sbatch's MASTER_PORT = 20000 + id % 10000) differ between two
# test sessions running at once on this machine.
FirstJobId={first_job_id}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Short waits: tests should not idle. KillWait is the SIGTERM -> SIGKILL gap on scancel/time-out.
KillWait=10
MinJobAge=600
InactiveLimit=0
SchedulerParameters=sched_interval=2
# Preemption by partition priority: a job in `high` requeues the jobs of `low` it needs the
# nodes of; they get the --signal signal (preempt_send_user_signal) and SIGTERM, then
# GraceTime seconds to checkpoint before SIGKILL.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=1 State=UNKNOWN
PartitionName=low Nodes=n1,n2 Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=30 MaxTime=INFINITE State=UP
PartitionName=high Nodes=n1,n2 PriorityTier=2 PreemptMode=OFF MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """A running private cluster: its folder, config and the environment for its client commands."""

    dir: Path
    conf: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment for sbatch/srun/squeue, pointing at this cluster's config."""
        return clean_env(SLURM_CONF=str(self.conf), **extra)

    def run(self, *cmd: str, timeout: float = 60, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=ROOT, env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
                                 f"\n{self.logs()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(self, job_id: str, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"),
                 timeout: float = 240) -> dict[str, str]:
        """Poll until the job is in one of ``states``; fail with the cluster logs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {self.job(job_id)}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        parts = []
        for log in sorted(self.dir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables (a job must not inherit ours)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "SBATCH_", "SRUN_",
                                "SALLOC_", "PMI_", "OMPI_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def slurm_missing_reason() -> str | None:
    """Why Slurm cannot run here (None when it can), installing it first when we may."""
    tools = ("slurmctld", "slurmd", "sbatch", "srun", "sinfo", "munged")
    if all(shutil.which(t) for t in tools):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be installed here (launch/install_slurm.sh needs root and apt-get)"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "install_slurm.sh")], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0 or not all(shutil.which(t) for t in tools):
        return f"launch/install_slurm.sh failed (exit {proc.returncode}): {proc.stderr[-1000:]}"
    return None


def start_cluster(base: Path) -> SlurmCluster:
    """Write the config into ``base`` and start munged, slurmctld and two slurmd; wait for idle nodes."""
    if os.geteuid() != 0:
        raise RuntimeError("the test Slurm cluster runs its daemons as root (SlurmUser=root)")
    base.chmod(0o755)  # munged (user munge) must reach its own folder inside
    munge_dir = base / "munge"
    munge_dir.mkdir()
    for sub in ("state", *(f"spool/{node}" for node in NODES)):
        (base / sub).mkdir(parents=True)
    ctld_port, n1_port, n2_port = _free_ports(3)
    conf = base / "slurm.conf"
    conf.write_text(_CONF.format(first_job_id=1 + os.getpid() % 9000, host=socket.gethostname(), ctld_port=ctld_port,
                                 n1_port=n1_port, n2_port=n2_port, munge_socket=munge_dir / "munge.socket", d=base))
    cluster = SlurmCluster(base, conf)
    try:
        _start_munged(cluster, munge_dir)
        cluster.procs["slurmctld"] = _popen(["slurmctld", "-D", "-i", "-f", str(conf)], base / "slurmctld.out")
        for node in NODES:
            cluster.procs[f"slurmd-{node}"] = _popen(["slurmd", "-D", "-N", node, "-f", str(conf)],
                                                     base / f"slurmd-{node}.out")
        _wait_idle(cluster)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel every job, wait for their processes to end, then stop the daemons we started (by pid)."""
    if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
        subprocess.run(["scancel", "--full", "--quiet", "--user=root"], env=cluster.env(), capture_output=True,
                       timeout=30)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "--noheader", "--states=all"], env=cluster.env(), capture_output=True,
                                 text=True, timeout=30)
            if out.returncode != 0 or not [line for line in out.stdout.splitlines()
                                           if any(s in line for s in (" R ", " CG ", " CF "))]:
                break
            time.sleep(1)
    # Node daemons first (their job steps are gone), the controller, then munged.
    for name in [n for n in cluster.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _start_munged(cluster: SlurmCluster, munge_dir: Path) -> None:
    """munged as user munge with a fresh key and a private socket (no clash with a system munged)."""
    munge = pwd.getpwnam("munge")
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (munge_dir, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    munge_dir.chmod(0o711)  # munged insists that everyone may traverse to its socket
    cmd = ["munged", "--foreground", f"--socket={munge_dir / 'munge.socket'}", f"--key-file={key}",
           f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
           f"--seed-file={munge_dir / 'munged.seed'}"]
    cluster.procs["munged"] = _popen(cmd, cluster.dir / "munged.out", user=munge.pw_uid, group=munge.pw_gid)
    _wait_for(lambda: (munge_dir / "munge.socket").exists(), "munged socket", cluster)


def _popen(cmd: list[str], log: Path, user: int | None = None, group: int | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        # Own session: a Ctrl-C aimed at pytest does not reach the daemons; teardown stops them.
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, user=user, group=group, extra_groups=[] if user else None,
                                preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """In the daemon's process before exec: get SIGTERM when the test process dies, even by SIGKILL.

    Runs after Popen switched user (a credential change would clear the setting), so it
    holds for munged too. PR_SET_PDEATHSIG = 1 (Linux prctl).
    """
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _wait_idle(cluster: SlurmCluster) -> None:
    def idle() -> bool:
        out = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], env=cluster.env(),
                             capture_output=True, text=True, timeout=30)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

    _wait_for(idle, "both nodes idle in sinfo", cluster)


def _wait_for(ready: Callable[[], bool], what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}\n{_outputs(cluster)}")
        if ready():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {START_TIMEOUT_S}s waiting for {what}\n{_outputs(cluster)}")


def _outputs(cluster: SlurmCluster) -> str:
    files = sorted(cluster.dir.glob("*.out")) + sorted(cluster.dir.glob("*.log"))
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}" for f in files)


def _free_ports(count: int, start: int = 17000) -> list[int]:
    """``count`` consecutive free TCP ports from ``start`` on (17000-17002 unless taken)."""
    for base in range(start, start + 2000, count):
        if all(_port_free(p) for p in range(base, base + count)):
            return list(range(base, base + count))
    raise RuntimeError(f"no {count} consecutive free ports in {start}..{start + 2000}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The private cluster for the whole test session; skipped (with the reason) only when Slurm cannot be installed."""
    reason = slurm_missing_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="peer-dist-slurm-"))
    cluster = start_cluster(base)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
        shutil.rmtree(base, ignore_errors=True)
