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
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from peer_dist.config import FaultsConfig
from peer_dist.errors import ConfigError
from peer_dist.fileio import write_atomic
from peer_dist.log import get_logger

# Exit codes of the injected crashes: distinct from 0 (done), 1 (a Python error), 2
# (EXIT_USER_ERROR), 75 (EXIT_PREEMPTED), 124 (timeout) and 128 + N (killed by signal N),
# so a test can tell that the crash it asked for is the one that happened.
EXIT_INJECTED_CRASH = 86
EXIT_INJECTED_SAVE_CRASH = 87

ENV_VAR = "PEER_DIST_FAULTS"

# Points inside save_checkpoint where during_save() is called (see FaultPlan.during_save).
SAVE_PHASES = ("start", "written", "commit")

# Keys each kind takes besides step (required) and rank (optional).
KINDS: dict[str, tuple[str, ...]] = {
    "crash": (),
    "crash_in_save": ("phase",),
    "fail_save": ("phase",),
    "nan": (),
    "inf": (),
    "spike": ("factor",),
    "hang": ("seconds",),
    "signal": ("sig", "target"),
    "corrupt_checkpoint": ("file",),
    "hide_checkpoint": (),
}
SIGNAL_TARGETS = ("self", "launcher")
# Keys added after specs were in use: left out of the canonical text at their default, so
# the text (and the once-only marker named after it) of an older spec stays the same.
_UNSTATED_DEFAULTS = {"target": "self"}
_LOSS_KINDS = ("nan", "inf", "spike")
_STEP_KINDS = ("crash", "hang", "signal")
_SYNTAX = "kind:step=N[:rank=R][:key=value...]"


@dataclass(frozen=True)
class Fault:
    """One parsed fault spec; fields a kind does not use keep their defaults."""

    kind: str
    step: int
    rank: int | None = None  # None: every rank
    phase: str = "written"  # crash_in_save, fail_save
    factor: float = 10.0  # spike
    seconds: float | None = None  # hang; None: for ever
    sig: int = int(signal.SIGTERM)  # signal
    target: str = "self"  # signal: this process or its launcher (the torchrun agent)
    file: str = "trainer_state.json"  # corrupt_checkpoint: a glob relative to the checkpoint folder

    def matches(self, step: int, rank: int) -> bool:
        return step == self.step and (self.rank is None or rank == self.rank)

    @property
    def spec(self) -> str:
        """Canonical text: the kind, step, rank and the kind's own keys (defaults written out)."""
        parts = [self.kind, f"step={self.step}"] + ([f"rank={self.rank}"] if self.rank is not None else [])
        for key in KINDS[self.kind]:
            value = getattr(self, key)
            if key in _UNSTATED_DEFAULTS and _UNSTATED_DEFAULTS[key] == value:
                continue
            if key == "sig":
                value = signal.Signals(value).name
            parts.append(f"{key}={'forever' if value is None else value}")
        return ":".join(parts)


# ---------------------------------------------------------------------------- parsing


def _int_at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be an integer >= {minimum}") from None
        if value < minimum:
            raise ValueError(f"must be an integer >= {minimum}")
        return value
    return parse


def _seconds(text: str) -> float | None:
    return None if text.lower() == "forever" else _positive_float(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a finite number > 0") from None
    if not 0 < value < float("inf"):
        raise ValueError("must be a finite number > 0")
    return value


def _phase(text: str) -> str:
    if text not in SAVE_PHASES:
        raise ValueError(f"allowed phases: {', '.join(SAVE_PHASES)}")
    return text


def _target(text: str) -> str:
    if text not in SIGNAL_TARGETS:
        raise ValueError(f"allowed targets: {', '.join(SIGNAL_TARGETS)}")
    return text


def _signal(text: str) -> int:
    """Any signal, SIGKILL included (a kill -9 drill): "SIGUSR1", "usr1" or a number."""
    try:
        if text.isdigit():
            return int(signal.Signals(int(text)))
        name = text.upper()
        return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except (KeyError, ValueError):
        raise ValueError("must be a signal name such as SIGTERM, SIGUSR1, SIGKILL, or its number") from None


def _relative_glob(text: str) -> str:
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts:
        raise ValueError("must be a path (glob) inside the checkpoint folder, e.g. trainer_state.json or state/*.pt")
    return text


_PARSERS = {"step": _int_at_least(1), "rank": _int_at_least(0), "phase": _phase, "factor": _positive_float,
            "seconds": _seconds, "sig": _signal, "file": _relative_glob, "target": _target}


def parse_fault(text: str, source: str = "fault") -> Fault:
    """``"crash:step=5:rank=1"`` -> :class:`Fault`; a clear ConfigError naming the spec otherwise.

    ``source`` names where the spec came from in messages (``faults.inject[0]``,
    ``PEER_DIST_FAULTS``).
    """
    spec = text.strip()
    where = f"{source}: fault spec {spec!r}"
    kind, *parts = [p.strip() for p in spec.split(":")]
    kind = kind.lower()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; allowed kinds: {', '.join(KINDS)} "
                          f"(syntax {_SYNTAX})")
    allowed = ("step", "rank", *KINDS[kind])
    values: dict[str, Any] = {}
    for part in parts:
        key, sep, raw = part.partition("=")
        key, raw = key.strip().lower(), raw.strip()
        if not sep or not key:
            raise ConfigError(f"{where}: {part!r} must look like key=value (syntax {_SYNTAX})")
        if key not in allowed:
            raise ConfigError(f"{where}: key {key!r} is not allowed for kind {kind}; "
                              f"allowed keys: {', '.join(allowed)}")
        if key in values:
            raise ConfigError(f"{where}: key {key!r} is given twice")
        try:
            values[key] = _PARSERS[key](raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}={raw!r} {exc}") from None
    if "step" not in values:
        raise ConfigError(f"{where}: step=N is required (the N-th optimizer step, as in the log lines; "
                          f"syntax {_SYNTAX})")
    return Fault(kind=kind, **values)


def split_specs(text: str) -> list[str]:
    """``"crash:step=5;nan:step=3, hang:step=2"`` -> the specs (``;`` or ``,`` separated, blanks dropped)."""
    return [s.strip() for s in text.replace(",", ";").split(";") if s.strip()]


def parse_faults(cfg: FaultsConfig, environ: Mapping[str, str] | None = None) -> list[Fault]:
    """The faults of ``faults.inject``, then those of ``PEER_DIST_FAULTS``, in order."""
    faults = []
    for i, item in enumerate(cfg.inject):
        faults += [parse_fault(s, f"faults.inject[{i}]") for s in split_specs(item)]
    env = os.environ if environ is None else environ
    faults += [parse_fault(s, ENV_VAR) for s in split_specs(env.get(ENV_VAR, ""))]
    return faults


# ---------------------------------------------------------------------------- the plan


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
