"""Fault injection for tests and drills: crash, hang, signal, NaN, corrupt a checkpoint — at a chosen step and rank.

Faults come from the config (``faults.inject``, a list of specs) followed by the
environment variable ``PEER_DIST_FAULTS`` (specs separated by ``;`` or ``,``)::

    kind:step=N[:rank=R][:key=value...]

``step=N`` is the N-th optimizer step (1-based): the number in the log line "step N" and
in the checkpoint name ``step_N``. Without ``rank=`` a fault fires on every rank.

Kinds, their own keys (default) and the hook that fires them:

* ``crash`` — after step N: ``os._exit(86)`` (:meth:`FaultPlan.after_step`)
* ``crash_in_save``, ``phase`` (written) — inside the save of step N's checkpoint, at
  ``phase`` (start / written / commit): ``os._exit(87)`` (:meth:`FaultPlan.during_save`)
* ``fail_save``, ``phase`` (written) — inside the save of step N's checkpoint, at
  ``phase``: an ``OSError`` (EIO), as a full disk or a failing file server gives; the
  process lives on. An asynchronous save reports it at the next step boundary on every
  rank and training goes on; a synchronous one (the final save, a stop-signal save)
  ends the job with exit 74 (``during_save``)
* ``nan`` / ``inf`` — every micro-batch loss of step N becomes NaN / +Inf (:meth:`FaultPlan.loss`)
* ``spike``, ``factor`` (10) — every micro-batch loss of step N is multiplied by factor (``loss``)
* ``nan_grad`` — the loss of step N stays finite but its backward gives NaN gradients (``loss``)
* ``hang``, ``seconds`` (forever) — after step N: sleep (``after_step``)
* ``signal``, ``sig`` (SIGTERM), ``target`` (self) — after step N: the signal to this
  process, or with ``target=launcher`` to its torchrun agent (a ``kill -9`` of the
  launcher: every rank must die with it; only under torchrun) (``after_step``)
* ``hide_checkpoint`` — the checkpoint of step N is invisible to this rank the first
  time the job chooses a checkpoint (resume, rollback) while it exists, as on a node
  whose view of a shared file system lags: no rank may use it then
  (:meth:`FaultPlan.hides_checkpoint`)
* ``corrupt_checkpoint``, ``file`` (trainer_state.json) — after step N's checkpoint is
  committed: 4 bytes in the middle of every file matching the glob ``file`` (relative to
  the checkpoint folder) are overwritten, size unchanged, so its sha256 check fails and
  resume falls back to the previous checkpoint (:meth:`FaultPlan.after_save`)

The loss faults multiply the loss tensor (``loss * nan``), so the backward pass spreads
NaN/Inf (or the spike) into the gradients as a real one would. A crash is abrupt:
``os._exit`` skips ``finally`` blocks, ``atexit`` and the process-group teardown, like a
killed or segfaulted process; only stdout/stderr are flushed so that the log says why.
For a kill by signal use ``signal:sig=SIGKILL``.

Fire once, on the first attempt only. After a crash the job restarts from the last
checkpoint (torchrun ``--max-restarts``, a Slurm requeue, the same command again) and
replays the steps after it, so "fire when step N is reached" would crash again for
ever, and "fire only if step N > the resume step" too (a crash at step 5 after a
checkpoint at step 4 resumes at 4). Instead, a fault that fires first writes (and
fsyncs) a marker file ``<marker_dir>/<kind>-step<N>-rank<R>-<hash>`` and a fault whose
marker exists never fires again: each (fault, rank) fires once per run folder, whatever
the restarts. The trainer passes ``marker_dir = <run_dir>/faults``; delete that folder
(or use a new run.name) to re-arm the faults. Without a marker folder a fault fires once
per process. Within a process, a replay after a rollback does not fire it again either
(the loss faults fire for each micro-batch of the first pass over step N only).
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from peer_dist.config import FaultsConfig
from peer_dist.errors import ConfigError
from peer_dist.fileio import write_atomic
from peer_dist.log import get_logger
from peer_dist.specs import ENV_VAR, KINDS, SAVE_PHASES, Fault, parse_fault, parse_faults, split_specs

# Exit codes of the injected crashes: distinct from 0 (done), 1 (a Python error), 2
# (EXIT_USER_ERROR), 75 (EXIT_PREEMPTED), 124 (timeout) and 128 + N (killed by signal N),
# so a test can tell that the crash it asked for is the one that happened.
EXIT_INJECTED_CRASH = 86
EXIT_INJECTED_SAVE_CRASH = 87

_LOSS_KINDS = ("nan", "inf", "spike", "nan_grad")
_STEP_KINDS = ("crash", "hang", "signal")


# ---------------------------------------------------------------------------- the plan


class _NaNGradient(torch.autograd.Function):
    """Identity forward; NaN backward: a finite loss whose gradients are all NaN."""

    @staticmethod
    def forward(ctx: object, loss: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class FaultPlan:
    """The faults of a run, and the hooks the trainer calls at fixed points on every rank.

    Every hook is cheap when no fault matches (a loop over a short list) and does
    nothing at all for an empty plan. ``rank`` is the global rank; ``step`` as in the
    module docstring. Hooks never communicate: a fault on one rank is the point.
    """

    def __init__(self, faults: Iterable[Fault] = (), marker_dir: str | Path | None = None) -> None:
        self.faults = tuple(faults)
        self.marker_dir = Path(marker_dir) if marker_dir is not None else None
        self._fired: set[tuple[Fault, int]] = set()  # (fault, rank) fired in this process
        self._fired_micro: set[tuple[Fault, int, int]] = set()  # loss faults: (fault, rank, micro-batch)

    @classmethod
    def from_config(cls, cfg: FaultsConfig, environ: Mapping[str, str] | None = None,
                    marker_dir: str | Path | None = None) -> FaultPlan:
        return cls(parse_faults(cfg, environ), marker_dir)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def describe(self) -> str:
        return "; ".join(f.spec for f in self.faults) or "none"

    def check_world(self, world: int, under_agent: bool = False) -> None:
        """ConfigError for a fault aimed at a rank the job does not have (it would never fire), or at a
        launcher it does not have (``under_agent``: torchrun's agent started this process)."""
        for fault in self.faults:
            if fault.rank is not None and fault.rank >= world:
                raise ConfigError(f"fault {fault.spec!r}: rank={fault.rank} does not exist in a world of "
                                  f"{world} (ranks 0..{world - 1})")
            if fault.target == "launcher" and not under_agent:
                raise ConfigError(f"fault {fault.spec!r}: target=launcher needs a job started by torchrun "
                                  "(its agent is the launcher); use target=self")

    def pending(self, rank: int) -> list[Fault]:
        """Faults for ``rank`` that have not fired, in this process or an earlier attempt (drill reports)."""
        return [f for f in self.faults if (f.rank is None or f.rank == rank) and (f, rank) not in self._fired
                and not (self.marker_dir is not None and self._marker(f, rank).exists())]

    # ------------------------------------------------------------------ hooks

    def loss(self, step: int, rank: int, loss: torch.Tensor, micro: int = 0) -> torch.Tensor:
        """Each micro-batch's loss of step N, before backward: NaN / Inf / spike faults change it.

        Keeps the autograd graph (a product), so the gradients get the NaN/Inf/spike too.
        """
        for fault in self.faults:
            if fault.kind in _LOSS_KINDS and fault.matches(step, rank) and self._claim(fault, rank, micro):
                if fault.kind == "nan_grad":
                    loss = _NaNGradient.apply(loss)
                    continue
                factor = {"nan": float("nan"), "inf": float("inf")}.get(fault.kind, fault.factor)
                loss = loss * factor
        return loss

    def after_step(self, step: int, rank: int) -> None:
        """After step N is complete (update, logging, validation and its checkpoint if any),
        before the stop-signal check: crash, hang or signal faults."""
        for fault in self.faults:
            if fault.kind in _STEP_KINDS and fault.matches(step, rank) and self._claim(fault, rank):
                if fault.kind == "crash":
                    _exit_now(EXIT_INJECTED_CRASH)
                elif fault.kind == "hang":
                    _hang(fault.seconds)
                else:
                    os.kill(os.getppid() if fault.target == "launcher" else os.getpid(), fault.sig)

    def during_save(self, step: int, rank: int, phase: str) -> None:
        """Inside the save of the checkpoint of step N, at ``phase`` (one of :data:`SAVE_PHASES`):

        * ``start``: the temporary folder exists, this rank has written nothing yet;
        * ``written``: this rank's files are in the temporary folder, before the barrier
          that precedes the commit (no manifest, no rename: the checkpoint stays incomplete);
        * ``commit``: rank 0 only, the manifest is written but the folder not yet renamed.
        """
        if phase not in SAVE_PHASES:
            raise ValueError(f"save phase {phase!r}; allowed: {', '.join(SAVE_PHASES)}")
        for fault in self.faults:
            if (fault.kind in ("crash_in_save", "fail_save") and fault.phase == phase and fault.matches(step, rank)
                    and self._claim(fault, rank)):
                if fault.kind == "crash_in_save":
                    _exit_now(EXIT_INJECTED_SAVE_CRASH)
                raise OSError(errno.EIO, f"injected write failure ({fault.spec})")

    def hides_checkpoint(self, step: int, rank: int) -> bool:
        """Whether the checkpoint of step N is invisible to ``rank`` (asked once per checkpoint and choice)."""
        return any(fault.kind == "hide_checkpoint" and fault.matches(step, rank) and self._claim(fault, rank)
                   for fault in self.faults)

    def after_save(self, step: int, rank: int, path: str | Path) -> None:
        """After the checkpoint of step N is committed at ``path``: corrupt_checkpoint faults."""
        for fault in self.faults:
            if fault.kind == "corrupt_checkpoint" and fault.matches(step, rank) and self._claim(fault, rank):
                files = sorted(p for p in Path(path).glob(fault.file) if p.is_file())
                if not files:
                    get_logger().warning("fault %s: no file %s under %s; nothing corrupted", fault.spec, fault.file,
                                         path)
                for file in files:
                    corrupt_file(file)

    # ------------------------------------------------------------------ once only

    def _marker(self, fault: Fault, rank: int) -> Path:
        assert self.marker_dir is not None
        digest = hashlib.sha256(fault.spec.encode()).hexdigest()[:12]
        return self.marker_dir / f"{fault.kind}-step{fault.step}-rank{rank}-{digest}"

    def _claim(self, fault: Fault, rank: int, micro: int | None = None) -> bool:
        """Whether ``fault`` fires now on ``rank``; records it first (marker on disk) if so.

        ``micro``: the micro-batch of a loss fault, which fires for every micro-batch of
        its first pass over step N and never again (a replay after a rollback included).
        """
        if micro is not None and (fault, rank) in self._fired:
            if (fault, rank, micro) in self._fired_micro:
                return False
            self._fired_micro.add((fault, rank, micro))
            return True
        if (fault, rank) in self._fired:
            return False
        if self.marker_dir is not None:
            marker = self._marker(fault, rank)
            if marker.exists():  # fired in an earlier attempt of this run
                return False
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, fault.spec + "\n")  # durable before the fault acts (a crash follows)
        self._fired.add((fault, rank))
        if micro is not None:
            self._fired_micro.add((fault, rank, micro))
        get_logger().error("injected fault fires: %s (rank %d)", fault.spec, rank)
        return True


def _exit_now(code: int) -> None:
    """End the process at once: no exception, no cleanup (what a crash looks like to the others)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _hang(seconds: float | None) -> None:
    """Sleep ``seconds`` (None: for ever); signal handlers still run (PEP 475 resumes the sleep)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    while deadline is None or time.monotonic() < deadline:
        time.sleep(3600.0 if deadline is None else min(3600.0, max(0.0, deadline - time.monotonic())))


_PATTERN = b"\xde\xad\xbe\xef"


def corrupt_file(path: Path) -> None:
    """Overwrite up to 4 bytes in the middle of ``path`` in place (size unchanged, sha256 changed).

    The same bytes every time, so ranks corrupting the same shared file cannot undo each
    other (flipping bits twice would). An empty file gets one byte.
    """
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        offset = size // 2
        fh.seek(offset)
        old = fh.read(len(_PATTERN))
        new = _PATTERN[:max(1, len(old))]
        if new == old:  # the file already holds the pattern there: flip it instead
            new = bytes(b ^ 0xFF for b in old)
        fh.seek(offset)
        fh.write(new)
        fh.flush()
        os.fsync(fh.fileno())


__all__ = ["EXIT_INJECTED_CRASH", "EXIT_INJECTED_SAVE_CRASH", "ENV_VAR", "SAVE_PHASES", "KINDS", "Fault",
           "FaultPlan", "corrupt_file", "parse_fault", "parse_faults", "split_specs"]
