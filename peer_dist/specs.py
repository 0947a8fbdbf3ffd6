"""The config's small string languages, parsed without torch: fault specs and signal names.

Validating a config checks them (a bad spec stops a run before any work), and reading a
config must stay light, so they live here rather than beside the code that acts on them
(:mod:`peer_dist.train.faults`, :mod:`peer_dist.train.signals`). Fault spec syntax and
semantics: see :mod:`peer_dist.train.faults`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol

from peer_dist.errors import ConfigError

_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}


class _FaultsSection(Protocol):
    inject: list[str]


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
    "nan_grad": (),
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


def _one_of(choices: tuple[str, ...], what: str) -> Any:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"allowed {what}: {', '.join(choices)}")
        return text
    return parse


def _lookup_signal(name: str | int) -> signal.Signals:
    """``"SIGTERM"``, ``"TERM"``, ``"usr1"`` or a number; ValueError for an unknown number,
    KeyError for an unknown name."""
    if isinstance(name, int) or name.strip().isdigit():
        return signal.Signals(int(name))
    key = name.strip().upper()
    return signal.Signals[key if key.startswith("SIG") else f"SIG{key}"]


def _signal(text: str) -> int:
    """Any signal, SIGKILL included (a kill -9 drill): "SIGUSR1", "usr1" or a number."""
    try:
        return int(_lookup_signal(text))
    except (KeyError, ValueError):
        raise ValueError("must be a signal name such as SIGTERM, SIGUSR1, SIGKILL, or its number") from None


def _relative_glob(text: str) -> str:
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts:
        raise ValueError("must be a path (glob) inside the checkpoint folder, e.g. trainer_state.json or state/*.pt")
    return text


_PARSERS = {"step": _int_at_least(1), "rank": _int_at_least(0), "phase": _one_of(SAVE_PHASES, "phases"), "factor": _positive_float,
            "seconds": _seconds, "sig": _signal, "file": _relative_glob, "target": _one_of(SIGNAL_TARGETS, "targets")}


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


def parse_faults(cfg: _FaultsSection, environ: Mapping[str, str] | None = None) -> list[Fault]:
    """The faults of ``faults.inject``, then those of ``PEER_DIST_FAULTS``, in order."""
    faults = []
    for i, item in enumerate(cfg.inject):
        faults += [parse_fault(s, f"faults.inject[{i}]") for s in split_specs(item)]
    env = os.environ if environ is None else environ
    faults += [parse_fault(s, ENV_VAR) for s in split_specs(env.get(ENV_VAR, ""))]
    return faults


def parse_signal(name: str | int) -> signal.Signals:
    """``"SIGTERM"``, ``"TERM"``, ``"usr1"`` or a number -> the signal; anything else is a clear error."""
    try:
        sig = _lookup_signal(name)
    except ValueError:
        raise ConfigError(f"signal number {name} does not exist on this system") from None
    except KeyError:
        raise ConfigError(f"unknown signal {name!r}; use a name such as SIGTERM, SIGUSR1, SIGUSR2, "
                          "SIGINT") from None
    if sig.name in _UNCATCHABLE:
        raise ConfigError(f"signal {sig.name} cannot be caught; use SIGTERM, SIGUSR1, SIGUSR2 or SIGINT")
    return sig
