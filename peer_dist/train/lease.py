"""One job per run folder: an exclusive lease on ``<run_dir>/lease.json``, held for the job's life.

Rank 0 takes the lease before the job reads a checkpoint or writes anything into the run
folder, refreshes it with a heartbeat while training runs, and deletes it when the job
ends. A second job that finds a live lease stops at once with a :class:`RunFolderBusy`
error naming the holder (host, pid, job, when it started, its last heartbeat): it reads
nothing and overwrites nothing.

Why a heartbeat file and not ``fcntl``/``flock`` locks: run folders live on shared file
systems (NFS, Lustre, GPFS) where POSIX locks are often unsupported, unreliable, or
survive a dead client for a long time. The lease only needs two operations that are
atomic there too: create-if-absent (``os.link`` of a finished temporary file onto
``lease.json`` fails if the name exists: the old NFS-safe lock idiom) and rename
(``os.replace`` for a heartbeat, ``os.rename`` to break a stale lease).

A lease is stale, and the next job takes it over, when

* its holder ran on this machine (same boot and pid namespace) and that process is gone
  (no such pid, a zombie, or the pid now belongs to a process started later), or
* its heartbeat is older than ``stale_after_s`` (any machine: a node that died, a job
  killed without cleanup). Holders on other machines are judged by the wall clock, so
  clocks must agree to within ``stale_after_s`` minus the heartbeat period (NTP does).

Its own job takes a lease over at once when torchrun restarted the job's workers
(``--max-restarts``: same ``TORCHELASTIC_RUN_ID``, a higher ``TORCHELASTIC_RESTART_COUNT``;
the agent stops every old worker before it starts new ones). A requeued Slurm job (same
``SLURM_JOB_ID``, a higher ``SLURM_RESTART_COUNT``) may start while its previous
allocation is still shutting down: it waits up to ``stale_after_s`` for that lease to be
released or to go stale, then takes it or refuses.

A holder that finds its lease taken over (its heartbeat stalled longer than the bound:
a frozen or suspended process, a file system outage) has lost the folder to another job:
it ends at once (exit :data:`~peer_dist.errors.EXIT_USER_ERROR`) without committing
anything; the trainer also checks the lease right before every checkpoint commit.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peer_dist.errors import EXIT_USER_ERROR, UserError
from peer_dist.log import get_logger

LEASE_FILE = "lease.json"
STALE_AFTER_S = 60.0  # a heartbeat older than this marks the holder as gone
HEARTBEAT_FRACTION = 6  # heartbeats per stale_after_s


class RunFolderBusy(UserError):
    """Another job holds (or took over) the lease on the run folder."""


@dataclass
class Holder:
    """Who holds a lease: enough to tell whether it is alive, and for a person to find it."""

    host: str
    machine: str  # boot id + pid namespace: processes on the same machine can check each other's pid
    pid: int
    pid_start: str  # the pid's start time in clock ticks since boot ('' if unknown): tells a reused pid apart
    job: str  # for people: "slurm job 1234", "torchrun run 5b1e…" or ""
    slurm_job: str = ""
    slurm_restart: int = 0
    run_id: str = ""  # TORCHELASTIC_RUN_ID
    attempt: int = 0  # TORCHELASTIC_RESTART_COUNT
    ranks: list[list[Any]] = field(default_factory=list)  # [host, pid] of every rank of the job
    started: float = 0.0  # time.time() when the lease was taken
    heartbeat: float = 0.0  # time.time() of the last refresh
    token: str = ""  # unique per acquisition

    @classmethod
    def this_process(cls, ranks: list[list[Any]] | None = None,
                     environ: Mapping[str, str] | None = None) -> Holder:
        env = os.environ if environ is None else environ
        pid = os.getpid()
        slurm_job, run_id = env.get("SLURM_JOB_ID", ""), env.get("TORCHELASTIC_RUN_ID", "")
        job = f"slurm job {slurm_job}" if slurm_job else f"torchrun run {run_id}" if run_id else ""
        now = time.time()
        return cls(host=socket.gethostname(), machine=machine_id(), pid=pid, pid_start=_pid_start(pid), job=job,
                   slurm_job=slurm_job, slurm_restart=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
                   run_id=run_id, attempt=int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
                   ranks=ranks or [[socket.gethostname(), pid]], started=now, heartbeat=now,
                   token=uuid.uuid4().hex)

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        where = f"host {self.host}, pid {self.pid}"
        if len(self.ranks) > 1:
            where = f"{len(self.ranks)} ranks, rank 0 on {where}"
        return (f"{self.job or 'a job'} ({where}), started {started}, "
                f"last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago")


def machine_id() -> str:
    """Processes with the same id see each other's pids: same kernel boot, same pid namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _pid_start(pid: int) -> str:
    """Start time of ``pid`` (field 22 of /proc/PID/stat), '' if unknown; 'zombie' for a dead, unreaped one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return "zombie" if fields[0] in ("Z", "X") else fields[19]


def _alive_here(holder: Holder) -> bool:
    """For a holder on this machine: whether its process still runs (and is the same process)."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    start = _pid_start(holder.pid)
    if start == "zombie":
        return False
    return not (holder.pid_start and start and start != holder.pid_start)


# ---------------------------------------------------------------------------- the lease file


def _read(path: Path) -> Holder | None | str:
    """The holder in ``path``; None if there is no file; a string saying why it cannot be read."""
    try:
        data = json.loads(path.read_text())
        return Holder(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _temporary(path: Path, holder: Holder) -> Path:
    tmp = path.with_name(f".{path.name}.{holder.token}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        json.dump(asdict(holder), fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def _create(path: Path, holder: Holder) -> bool:
    """Create ``path`` holding ``holder`` if no such file exists; atomic, also on NFS."""
    tmp = _temporary(path, holder)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _break(path: Path, stale: Holder) -> bool:
    """Remove the stale lease ``stale``, unless ``path`` meanwhile holds another one; whether removed.

    Two jobs may both find the same lease stale: the rename lets one of them move it away;
    the other then moves nothing (FileNotFoundError) or a fresh lease, which it puts back.
    """
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = _read(aside)
    if isinstance(moved, Holder) and moved.token != stale.token:  # a fresh lease: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def takeover_reason(current: Holder, me: Holder, stale_after_s: float, now: float) -> str | None:
    """Why ``me`` may take the lease ``current`` over at once; None when it is held."""
    if current.run_id and current.run_id == me.run_id and me.attempt > current.attempt:
        return f"torchrun restarted this job's workers (attempt {current.attempt} -> {me.attempt})"
    if current.machine == me.machine and current.pid == me.pid and current.pid_start == me.pid_start:
        return "left by this process"
    if current.machine == me.machine and not _alive_here(current):
        return f"its holder (pid {current.pid} on this machine) is gone"
    if now - current.heartbeat > stale_after_s:
        return f"its last heartbeat is {now - current.heartbeat:.0f} s old (stale after {stale_after_s:g} s)"
    return None


def _waits_for(current: Holder, me: Holder) -> bool:
    """A requeued Slurm job whose earlier allocation still holds the lease waits for it."""
    return bool(current.slurm_job) and current.slurm_job == me.slurm_job and me.slurm_restart > current.slurm_restart


class RunLease:
    """A lease held by this process; :meth:`release` (or the end of the process) gives it up."""

    def __init__(self, path: Path, holder: Holder, stale_after_s: float = STALE_AFTER_S,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.holder = holder
        self.stale_after_s = stale_after_s
        self.on_lost = on_lost or _exit_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._lost: str | None = None

    @classmethod
    def acquire(cls, run_dir: Path, holder: Holder, stale_after_s: float = STALE_AFTER_S,
                on_lost: Callable[[str], None] | None = None, poll_s: float = 1.0) -> RunLease:
        """Take the lease of ``run_dir`` (created if missing) or raise :class:`RunFolderBusy`."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LEASE_FILE
        deadline = None
        while True:
            if _create(path, holder):
                return cls(path, holder, stale_after_s, on_lost)
            current = _read(path)
            if current is None:  # released meanwhile: try again
                continue
            if isinstance(current, str):
                raise RunFolderBusy(f"run folder {run_dir} has a lease file {path.name} that cannot be read "
                                    f"({current}); if no job uses this folder, delete {path} and start again")
            now = time.time()
            reason = takeover_reason(current, holder, stale_after_s, now)
            if reason is not None:
                if _break(path, current):
                    get_logger().warning("run folder lease of %s taken over: %s", current.describe(now), reason)
                continue
            if _waits_for(current, holder):
                deadline = deadline or time.monotonic() + stale_after_s + stale_after_s / HEARTBEAT_FRACTION
                if time.monotonic() < deadline:
                    get_logger().warning("run folder %s is still held by the previous allocation of this Slurm "
                                         "job, %s; waiting for it to end", run_dir, current.describe(now))
                    time.sleep(poll_s)
                    continue
            raise RunFolderBusy(
                f"run folder {run_dir} is in use by another job: {current.describe(now)}. Wait for it to end or "
                f"stop it, or pick another run.name; a lease whose holder is gone is taken over on the next start "
                f"(on this machine at once, elsewhere {stale_after_s:g} s after its last heartbeat)")

    # ------------------------------------------------------------------ while held

    def start_heartbeat(self) -> RunLease:
        """Refresh the lease every ``stale_after_s / 6`` seconds in a background thread."""
        period = self.stale_after_s / HEARTBEAT_FRACTION
        self._thread = threading.Thread(target=self._beat, args=(period,), name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.refresh()
            except OSError as exc:  # a file system hiccup: the next beat tries again
                get_logger().warning("run folder lease %s: heartbeat failed: %s", self.path, exc)

    def refresh(self) -> None:
        """Write a new heartbeat; calls ``on_lost`` if another job holds the lease now."""
        with self._lock:
            if self._stop.is_set():
                return
            self.holder.heartbeat = time.time()
            if _read(self.path) is None and _create(self.path, self.holder):  # deleted by hand: still ours
                get_logger().warning("run folder lease %s was deleted while this job held it; taken again", self.path)
                return
            problem = self._problem()
            if problem is None:
                # Another job breaks a lease only after stale_after_s without a heartbeat; the moment
                # between this check and the replace is far shorter than that.
                os.replace(_temporary(self.path, self.holder), self.path)
                return
        self._lose(problem)

    def check(self) -> None:
        """Raise :class:`RunFolderBusy` unless this process still holds the lease (before a commit)."""
        problem = self._problem()
        if problem is not None:
            self._lose(problem)
            raise RunFolderBusy(problem)

    def _problem(self) -> str | None:
        if self._lost is not None:
            return self._lost
        current = _read(self.path)
        if isinstance(current, Holder) and current.token == self.holder.token:
            return None
        who = current.describe() if isinstance(current, Holder) else "nobody (the lease file is gone)"
        return f"lost the lease on run folder {self.path.parent} to {who}"

    def _lose(self, problem: str) -> None:
        first = self._lost is None
        self._lost = problem
        self._stop.set()
        if first:
            self.on_lost(problem)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still this job's."""
        with self._lock:
            self._stop.set()
            if self._lost is None and self._problem() is None:
                self.path.unlink(missing_ok=True)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)


def _exit_lost(problem: str) -> None:
    """Another job owns the run folder now: leave at once, committing nothing more."""
    get_logger().error("%s: stopping now without writing anything more", problem)
    os._exit(EXIT_USER_ERROR)


def take_run_lease(run_dir: Path, stale_after_s: float = STALE_AFTER_S) -> RunLease | None:
    """Collective: rank 0 takes the lease of ``run_dir`` for the job; the lease on rank 0, None elsewhere.

    Every rank learns the outcome (one broadcast), so a refused job ends on every rank
    with the same one-line error instead of leaving the other ranks waiting in a collective.
    """
    import torch.distributed as dist

    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, [socket.gethostname(), os.getpid()])  # named in the lease for people
    lease, outcome = None, [None]
    if dist.get_rank() == 0:
        try:
            lease = RunLease.acquire(run_dir, Holder.this_process(ranks), stale_after_s).start_heartbeat()
        except RunFolderBusy as exc:
            outcome = [("busy", str(exc))]
        except OSError as exc:
            outcome = [("io", f"cannot take the lease on run folder {run_dir}: {exc}")]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        kind, message = outcome[0]
        raise RunFolderBusy(message) if kind == "busy" else UserError(message)
    return lease
