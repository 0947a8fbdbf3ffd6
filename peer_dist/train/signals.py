"""Stop on a signal at a step every rank agrees on; requeue under Slurm.

Slurm sends ``SIGUSR1`` before the time limit (``--signal=USR1@120`` in
slurm/train.sbatch) and ``SIGTERM`` on cancel or preemption; other schedulers and
torchrun's agent send ``SIGTERM``. The signal may reach one rank only (``kill`` of one
process) or all ranks at slightly different times, so no rank may act on it alone: the
handler only records it, and :meth:`PreemptionHandler.stop_requested` all-reduces the
flag (MAX) so that every rank sees "stop" at the same step. The trainer then writes a
checkpoint, rank 0 calls :func:`requeue_slurm_job` (under Slurm), and every rank exits
with :data:`EXIT_PREEMPTED`. The next attempt resumes from that checkpoint.

Use::

    with PreemptionHandler(("SIGTERM", "SIGUSR1")) as stop:
        for step in ...:
            train_step()
            if stop.stop_requested():   # collective: every rank, same place, every step
                save_checkpoint(); barrier()
                if rank == 0: requeue_slurm_job()
                return EXIT_PREEMPTED
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from peer_dist.log import get_logger
from peer_dist.specs import parse_signal

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

# Exit code of a run that stopped on a signal after writing a checkpoint: "try again
# later" (EX_TEMPFAIL in sysexits.h). Distinct from 0 (finished: Slurm would mark the
# job COMPLETED and never requeue it), 1 (a crash) and 2 (EXIT_USER_ERROR, a bad
# config/data/launch). slurm/train.sbatch requeues on it; a cluster may instead set
# RequeueExit=75 in slurm.conf.
EXIT_PREEMPTED = 75

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
# Exit code of a second Ctrl-C: abort at once (128 + SIGINT, as a shell reports it).
EXIT_ABORTED = 130


def _say(text: str) -> None:
    """One line on stderr from rank 0 (or a process without a rank), safe inside a signal handler."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, text.encode())


class PreemptionHandler:
    """Records stop signals; :meth:`stop_requested` turns them into one decision for all ranks.

    ``install()`` (or ``with``) replaces the handlers of ``signals`` and ``close()``
    restores the previous ones. The handler does no work: it sets a flag and remembers
    which signal came (no logging, no I/O, no collectives: any of them could deadlock
    or corrupt state when the signal interrupts the same code). Python runs handlers in
    the main thread, so install from the main thread.
    """

    def __init__(self, signals: Iterable[str | int] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(dict.fromkeys(parse_signal(s) for s in signals))
        self.received: signal.Signals | None = None  # the first stop signal this process got
        self._local = False
        self._previous: dict[signal.Signals, Any] = {}
        self._reported = False
        self._interrupted = False  # a first SIGINT (Ctrl-C) arrived

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must run in the main thread (Python signal handlers)")
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def close(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def switch_to(self, signals: Iterable[str | int]) -> PreemptionHandler:
        """Handle exactly ``signals`` from now on: install the new ones, put back the others.

        ``peer-dist train`` installs the default set before it loads torch and reads the
        config, so that a stop signal during start-up is not lost; the config's
        ``train.stop_signals`` then replaces it. A signal that came in the meantime and is
        not in the config's set is delivered again to its own handler, as if it had arrived
        now (SIGTERM terminates, SIGINT raises KeyboardInterrupt).
        """
        wanted = tuple(dict.fromkeys(parse_signal(s) for s in signals))
        installed = bool(self._previous)
        for sig in [s for s in self._previous if s not in wanted]:
            previous = self._previous.pop(sig)
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self.signals = wanted
        if installed:
            self.install()
        if self.received is not None and self.received not in wanted:
            late, self.received, self._local, self._interrupted = self.received, None, False, False
            signal.raise_signal(late)
        return self

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only assignments and os.write: safe whatever the main thread was doing.
        if signum == signal.SIGINT and self._interrupted:
            # A second Ctrl-C: leave now. Checkpoints are committed atomically (a temporary
            # folder renamed into place), so the last committed one stays intact.
            _say("\npeer-dist: second Ctrl-C: aborting now; the last committed checkpoint is kept\n")
            os._exit(EXIT_ABORTED)
        if signum == signal.SIGINT:
            self._interrupted = True
            _say("\npeer-dist: Ctrl-C: finishing the step and writing a checkpoint "
                 "(Ctrl-C again aborts at once)\n")
        if self.received is None:
            self.received = signal.Signals(signum)
        self._local = True

    @property
    def local_request(self) -> bool:
        """Whether this process got a stop signal (no communication)."""
        return self._local

    def stop_requested(self, group: dist.ProcessGroup | None = None,
                       device: torch.device | None = None) -> bool:
        """Whether any rank of ``group`` got a stop signal; the same answer on every rank.

        A collective: every rank of ``group`` must call it at the same point (e.g. after
        every optimizer step). Reduction: MAX over the ranks of a 0/1 flag, i.e. a
        logical OR — one signalled rank stops all. Without an initialised process group
        it is this process's own flag. ``device``: where the flag tensor lives (default:
        the current CUDA device for NCCL, the CPU otherwise).
        """
        import torch  # here, not at the top: `peer-dist train` installs the handler before torch loads
        import torch.distributed as dist

        from peer_dist.parallel.env import flag_device

        if not (dist.is_available() and dist.is_initialized()):
            stop = self._local
        else:
            flag = torch.tensor([1 if self._local else 0], dtype=torch.int32, device=device or flag_device(group))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            stop = bool(flag.item())  # NOTE: host sync (a 4-byte all-reduce per call)
        if stop and not self._reported:
            self._reported = True
            how = f"got {self.received.name}" if self.received else "another rank got a stop signal"
            get_logger().warning("stop requested (%s): finishing with a checkpoint", how)
        return stop


def requeue_slurm_job(environ: dict[str, str] | None = None, timeout_s: float = 60.0) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when running under Slurm; whether the requeue was accepted.

    Call it on one rank (rank 0) after the checkpoint is committed: Slurm stops the job
    right away (SIGTERM to every process, then SIGKILL) and starts it again later with
    the same job id. Outside Slurm, or if scontrol is missing or refuses (e.g. the job
    was not submitted with --requeue and JobRequeue=0), it returns False and logs why;
    the caller still exits with :data:`EXIT_PREEMPTED`.
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return False
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        get_logger().warning("could not requeue Slurm job %s: %s", job_id, exc)
        return False
    if proc.returncode != 0:
        get_logger().warning("scontrol requeue %s failed (exit %d): %s", job_id, proc.returncode,
                             proc.stderr.strip())
        return False
    get_logger().warning("requeued Slurm job %s; it resumes from the last checkpoint", job_id)
    return True
