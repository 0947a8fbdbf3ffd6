"""Checkpoints committed atomically, verified on load, with fall-back to the previous good one.

Layout under ``<run_dir>/checkpoints/``::

    step_000100/            one committed checkpoint
        state/              model + optimizer state, independent of the parallel layout
                            (peer_dist/checkpoint/portable.py: dense.pt, experts/<layer>.epK.pt)
        rng/rank_00000.pt   each rank's RNG states (python, numpy, torch)
        trainer_state.json  step, consumed samples/tokens, layout, config hash, data fingerprint
        config.toml         the resolved config of the run
        manifest.json       every file above with size and sha256 (written last, fsync'd)
    latest                  name of the newest committed checkpoint (atomic os.replace)

Commit protocol: every rank writes into ``.tmp-step_N/``; the ranks agree that every
rank has written (one all-reduce: a rank whose write failed says so, and then nobody
commits); rank 0 fsyncs and hashes the files, writes and fsyncs the manifest, renames the
folder to ``step_N`` and replaces ``latest``; the ranks agree that the commit happened.
Asynchronous saves do the writing in a background thread per rank and report how it
ended at a later step boundary (:func:`poll_async_save`).

Resume and rollback take the newest checkpoint every rank can read, chosen together
(:func:`choose_checkpoint`): rank 0 proposes, each rank verifies the files it will read
against the manifest, and all ranks take the same decision from the gathered answers.
DeepSpeed's own checkpoint is not used: it
cannot reload at another EP/DP size, writes one file per expert for native MoE, and
its ``latest`` is written without fsync before its final barrier.
The folder must be on a file system every rank sees (as for any multi-node trainer).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from peer_dist.checkpoint.portable import (
    DENSE_FILE, EXPERTS_DIR, collect_portable, expert_files_to_read, full_model_state, load_portable, write_files,
)
from peer_dist.errors import CheckpointError, CheckpointSaveError
from peer_dist.fileio import fsync_path, sha256_bytes, sha256_file, write_atomic
from peer_dist.log import get_logger
from peer_dist.parallel.env import flag_device
from peer_dist.parallel.layout import ParallelLayout

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
STATE_DIR = "state"


@dataclass
class Checkpoint:
    path: Path
    step: int

    def trainer_state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE).read_text())


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ---------------------------------------------------------------------------- save


def save_checkpoint(ckpt_root: Path, step: int, engine: Any, trainer_state: dict[str, Any],
                    config_toml: str, keep: int, layout: ParallelLayout, tp_group: Any = None,
                    on_phase: Callable[[str], None] | None = None, asynchronous: bool = False,
                    timeout_s: float = 600.0) -> Path:
    """Collective: every rank calls it. Returns the folder the checkpoint is (or will be) committed to.

    Synchronous: returns once the checkpoint is committed. If any rank cannot write its
    files, or rank 0 cannot commit, every rank raises the same :class:`CheckpointSaveError`
    and nothing is committed (the previous checkpoint stays the newest).

    Asynchronous: returns once the state is gathered and copied (the only collective part);
    a background thread per rank writes the files and leaves a marker (or, on an error, a
    failure marker with the reason), and rank 0's thread commits when every rank's marker is
    there. It waits at most ``timeout_s`` (train.collective_timeout_s) and gives up at once
    when a rank reports a failure. Until the commit the previous checkpoint is the newest
    valid one, so a crash or a failed write loses nothing committed. The outcome is
    collected collectively: :func:`poll_async_save` at every step boundary,
    :func:`await_async_save` before the next save, a rollback or the end; a save refuses
    to start while the previous one is unreported.

    ``on_phase(phase)`` runs at "start" (before writing), "written" (this rank's files are
    on disk) and, on rank 0, "commit" (manifest written, folder not yet renamed): the
    fault-injection points, and where the trainer checks its run-folder lease. An
    exception there fails the save like a failed write.
    """
    global _pending
    on_phase = on_phase or (lambda _phase: None)
    if _pending is not None:
        raise RuntimeError("await_async_save() must collect the previous asynchronous save before the next one")
    rank = dist.get_rank()
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for old in ckpt_root.glob(".tmp-step_*"):  # left by a crash or a failed save: never committed
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # the previous save is settled everywhere; tmp is fresh
    files = {f"{STATE_DIR}/{k}": v for k, v in collect_portable(engine, layout, tp_group, copy=asynchronous).items()}
    files[_rng_file(rank)] = rng_state()
    texts = {STATE: json.dumps(trainer_state, indent=2, sort_keys=True), "config.toml": config_toml} if rank == 0 else {}

    def write() -> None:
        _write_rank_files(tmp, files, texts, on_phase)

    def commit(before_rename: Callable[[], None] = lambda: None) -> None:
        _commit(tmp, final, ckpt_root, on_phase, before_rename)
        _prune(ckpt_root, keep)

    if not asynchronous:
        _agree(ckpt_root, final.name, _attempt(write))  # every rank has written its files
        _agree(ckpt_root, final.name, _attempt(commit) if rank == 0 else None)
        return final
    _pending = _AsyncSave(final.name, tmp)
    _pending.start(write, commit, rank, dist.get_world_size(), timeout_s)
    return final


def commit_offline(ckpt_root: Path, step: int, files: dict[str, Any], texts: dict[str, str]) -> Path:
    """One process, no process group: write ``files`` (torch.save) and ``texts`` as committed checkpoint ``step``.

    For tools that make a checkpoint out of another (``peer-dist grow``): the same
    folder layout, manifest and commit protocol as a training save.
    """
    final, tmp = ckpt_root / step_dir_name(step), ckpt_root / f".tmp-{step_dir_name(step)}"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    _write_rank_files(tmp, files, texts, lambda _phase: None)
    _commit(tmp, final, ckpt_root, lambda _phase: None, lambda: None)
    return final


@dataclass
class SaveOutcome:
    """How an asynchronous save ended, the same on every rank: ``errors`` maps rank -> what went wrong."""

    name: str  # step_NNNNNN
    errors: dict[int, str]

    @property
    def ok(self) -> bool:
        return not self.errors

    def describe(self) -> str:
        return "; ".join(f"rank {r}: {e}" for r, e in sorted(self.errors.items()))


@dataclass
class _AsyncSave:
    """This rank's asynchronous save: the writer thread and what it reported."""

    name: str
    tmp: Path
    thread: threading.Thread | None = None
    error: str | None = None  # set by the writer thread
    reported: bool = False  # the outcome went out at a step boundary (a straggler may still write)
    cancel: threading.Event = field(default_factory=threading.Event)  # rank 0: do not commit
    committing: bool = False  # rank 0: past the point of no return (the rename)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, write: Callable[[], None], commit: Callable[[Callable[[], None]], None], rank: int,
              world: int, timeout_s: float) -> None:
        def run() -> None:
            try:
                write()
                (self.tmp / f".written-rank-{rank:05d}").touch()
                if rank == 0:
                    _wait_for_markers(self.tmp, world, timeout_s, self.cancel)
                    for marker in self.tmp.glob(".written-rank-*"):  # not part of the checkpoint
                        marker.unlink()
                    commit(self.claim_commit)
            except Exception as exc:  # reported at the next step boundary, on every rank
                self.error = _describe(exc)
                try:  # tells rank 0's committer at once (it stops waiting for this rank's marker)
                    (self.tmp / f".failed-rank-{rank:05d}").write_text(self.error)
                except OSError:
                    pass

        self.thread = threading.Thread(target=run, name=f"checkpoint-{self.name}", daemon=True)
        self.thread.start()

    def claim_commit(self) -> None:
        """Rank 0's writer, right before the rename: commit only if nobody gave up on this save."""
        with self.lock:
            if self.cancel.is_set():
                raise CheckpointSaveError("given up before the commit (see the failure reported for this save)")
            self.committing = True

    def give_up(self, reason: str) -> None:
        """The wait for this save ran out: it must not commit later; unless the rename already began."""
        with self.lock:
            if self.committing:
                return
            self.cancel.set()
            self.error = self.error or reason
        assert self.thread is not None
        self.thread.join(timeout=5.0)  # it stops at its next check


_pending: _AsyncSave | None = None


def poll_async_save() -> SaveOutcome | None:
    """Collective, at every step boundary: the outcome of the asynchronous save in flight, once known.

    None while every rank is still writing (or nothing is pending). Costs one 16-byte
    all-reduce per step while a save is in flight, nothing otherwise. A failure on any rank
    is reported at the first boundary after it, on every rank, even while other ranks still
    write; rank 0 then gives up that save (it will not commit it).
    """
    global _pending
    p = _pending
    if p is None or p.reported:  # the same on every rank: set by the same collective decisions
        return None
    assert p.thread is not None
    errors, running = _gather_errors(p.error, running=p.thread.is_alive())
    if running and not errors:
        return None
    p.reported = True
    if errors:
        p.cancel.set()
    if not running:
        _pending = None
    return SaveOutcome(p.name, errors)


def await_async_save(timeout_s: float) -> SaveOutcome | None:
    """Collective: wait (at most ``timeout_s``) for this rank's asynchronous save; its outcome if not yet reported.

    A writer still busy after ``timeout_s`` counts as failed (rank 0 will not commit that
    save) and is left behind: the next save does not depend on it.
    """
    global _pending
    p = _pending
    if p is None:
        return None
    assert p.thread is not None
    p.thread.join(timeout_s)
    if p.thread.is_alive():
        p.give_up(f"still writing after {timeout_s:g} s (train.collective_timeout_s)")
    _pending = None
    if p.reported:  # the same on every rank
        return None
    errors, _ = _gather_errors(p.error)
    return SaveOutcome(p.name, errors)


def wait_for_pending_save(timeout_s: float = 600.0) -> None:
    """Not collective, for the way out after an error: let this rank's writer finish (bounded)."""
    global _pending
    if _pending is not None and _pending.thread is not None:
        _pending.thread.join(timeout_s)
    _pending = None


def _attempt(action: Callable[[], None]) -> str | None:
    try:
        action()
    except Exception as exc:
        return _describe(exc)
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _gather_errors(error: str | None, running: bool = False) -> tuple[dict[int, str], int]:
    """Collective: every rank's error (rank -> text, only those with one) and how many ranks still run."""
    flags = torch.tensor([error is not None, running], dtype=torch.int64, device=flag_device())
    dist.all_reduce(flags)  # SUM: ranks with an error, ranks still writing
    failed, still_running = flags.tolist()  # NOTE: host sync (16 bytes)
    if not failed:
        return {}, still_running
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    return {r: e for r, e in enumerate(gathered) if e is not None}, still_running


def _agree(ckpt_root: Path, name: str, error: str | None) -> None:
    """Collective barrier that raises the same CheckpointSaveError on every rank if any rank had an error."""
    errors, _ = _gather_errors(error)
    if errors:
        newest = next(iter(list_checkpoints(ckpt_root)), None)
        outcome = SaveOutcome(name, errors)
        raise CheckpointSaveError(f"checkpoint {ckpt_root / name} was not committed: {outcome.describe()}; the "
                                  f"newest committed checkpoint is {newest.path.name if newest else 'none'}")


def _write_rank_files(tmp: Path, files: dict[str, Any], texts: dict[str, str],
                      on_phase: Callable[[str], None]) -> None:
    on_phase("start")
    write_files(tmp, files)
    for name, text in texts.items():
        (tmp / name).write_text(text)
    on_phase("written")


def _wait_for_markers(tmp: Path, world: int, timeout_s: float, cancel: threading.Event) -> None:
    """Rank 0's writer: until every rank left its marker; fails at once on a rank's failure marker."""
    deadline = time.monotonic() + timeout_s
    while len(list(tmp.glob(".written-rank-*"))) < world:
        failed = sorted(tmp.glob(".failed-rank-*"))
        if failed:
            rank = int(failed[0].name.rsplit("-", 1)[1])
            raise CheckpointSaveError(f"rank {rank} could not write its files: {failed[0].read_text()}")
        if cancel.is_set():
            raise CheckpointSaveError("given up: another rank failed")
        if time.monotonic() > deadline:
            raise CheckpointSaveError(f"not every rank wrote its files within {timeout_s:g} s "
                                      "(train.collective_timeout_s)")
        cancel.wait(0.05)


def _commit(tmp: Path, final: Path, ckpt_root: Path, on_phase: Callable[[str], None],
            before_rename: Callable[[], None]) -> None:
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for path in files:  # durable before the manifest says they are there
        fsync_path(path)
    manifest = {"files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                          for p in files}}
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    on_phase("commit")
    before_rename()
    if final.exists():  # a re-save of the same step (e.g. after a rollback) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(ckpt_root)
    write_atomic(ckpt_root / "latest", final.name)
    get_logger().info("checkpoint committed: %s (%d files)", final, len(files))


def _prune(ckpt_root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(ckpt_root)[keep:]:
        shutil.rmtree(old.path, ignore_errors=True)


# ---------------------------------------------------------------------------- find and verify


def list_checkpoints(ckpt_root: Path) -> list[Checkpoint]:
    """Committed checkpoint folders, newest first (temporary folders are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = [Checkpoint(p, int(m.group(1))) for p in ckpt_root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, key=lambda c: c.step, reverse=True)


def verify(ckpt: Checkpoint) -> str | None:
    """None when every file in the manifest is present with its size and sha256; else why not."""
    entries = _manifest_entries(ckpt)
    if isinstance(entries, str):
        return entries
    return verify_files(ckpt, entries, entries)


def _manifest_entries(ckpt: Checkpoint) -> dict[str, Any] | str:
    """The manifest's file entries, or why there are none."""
    try:
        raw = (ckpt.path / MANIFEST).read_bytes()
    except FileNotFoundError:
        return "no manifest (the save did not complete)"
    return _parse_manifest(raw)


def _parse_manifest(raw: bytes) -> dict[str, Any] | str:
    try:
        return json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError):
        return "manifest does not parse"


def verify_files(ckpt: Checkpoint, entries: dict[str, Any], names: Iterable[str]) -> str | None:
    """None when each of ``names`` is in the manifest and on disk with its size and sha256; else why not."""
    for rel in names:
        meta = entries.get(rel)
        if meta is None:
            return f"file {rel} is not in the manifest"
        path = ckpt.path / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != meta["bytes"]:
            return f"file {rel} has {path.stat().st_size} bytes, manifest says {meta['bytes']}"
        if sha256_file(path) != meta["sha256"]:
            return f"file {rel} fails its sha256 check"
    return None


def latest_good(ckpt_root: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies (every file); damaged ones are reported and skipped.

    One process on its own (eval, export). A training job uses :func:`choose_checkpoint`.
    """
    log = get_logger()
    for ckpt in list_checkpoints(ckpt_root):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s; falling back to the previous one", ckpt.path, problem)
    return None


def choose_checkpoint(ckpt_root: Path, layout: ParallelLayout, expert_layout: str | None = None,
                      visible: Callable[[Checkpoint], bool] | None = None) -> Checkpoint | None:
    """Collective: the newest checkpoint that every rank can read, the same one on every rank.

    Rank 0 lists the committed checkpoints (newest first) and broadcasts the list: one it
    does not see is never a candidate. For each candidate, every rank reads the manifest it
    sees and verifies (size, sha256) only the files it will load (:func:`files_to_load`);
    the answers (manifest sha256, problem) are all-gathered, and a candidate is taken only
    when no rank has a problem and all saw the same manifest. Each rank decides from the
    same gathered answers, so the ranks cannot disagree; a checkpoint that one rank cannot
    see (a file system view that lags) is skipped by all. ``visible``: fault injection.
    """
    visible = visible or (lambda _ckpt: True)
    rank, world = dist.get_rank(), dist.get_world_size()
    names: list[Any] = [[c.path.name for c in list_checkpoints(ckpt_root) if visible(c)] if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    for name in names[0]:
        ckpt = Checkpoint(ckpt_root / name, int(name.split("_")[1]))
        answer = _readable(ckpt, layout, expert_layout) if visible(ckpt) else (None, "not visible on this rank")
        answers: list[Any] = [None] * world
        dist.all_gather_object(answers, answer)
        problems = [f"rank {r}: {problem}" for r, (_, problem) in enumerate(answers) if problem]
        if not problems and len({digest for digest, _ in answers}) > 1:
            problems = ["the ranks see different manifests (their views of the file system disagree)"]
        if not problems:
            return ckpt
        if rank == 0:
            get_logger().warning("skipping checkpoint %s: %s; falling back to the previous one", ckpt.path,
                                 "; ".join(problems))
    return None


def _readable(ckpt: Checkpoint, layout: ParallelLayout, expert_layout: str | None) -> tuple[str | None, str | None]:
    """(sha256 of the manifest this rank sees, None or why this rank cannot load ``ckpt``)."""
    try:
        raw = (ckpt.path / MANIFEST).read_bytes()
    except OSError:
        return None, "no manifest (the save did not complete)"
    entries = _parse_manifest(raw)
    if isinstance(entries, str):
        return sha256_bytes(raw), entries
    problem = verify_files(ckpt, entries, [STATE])  # small, and it says which other files to read
    if problem is None:
        problem = verify_files(ckpt, entries, files_to_load(ckpt, entries, layout, expert_layout))
    return sha256_bytes(raw), problem


def files_to_load(ckpt: Checkpoint, entries: dict[str, Any], layout: ParallelLayout,
                  expert_layout: str | None = None) -> list[str]:
    """The checkpoint files (relative paths) this rank reads to resume at ``layout``.

    The trainer state, the dense state, this rank's RNG state when the saving run had the
    same world size, and the expert shard files this rank takes rows from: those whose
    range of expert positions meets this rank's when the saving run used the same
    ``parallel.expert_layout`` (its own shard at the same EP size), else every shard
    (:func:`expert_files_to_read`).
    """
    state = ckpt.trainer_state()
    rank = dist.get_rank()
    names = [STATE, f"{STATE_DIR}/{DENSE_FILE}"]
    if state.get("world") == dist.get_world_size() and _rng_file(rank) in entries:
        names.append(_rng_file(rank))
    same_owners = expert_layout is not None and state.get("expert_layout") == expert_layout
    saved_ep = state.get("layout", {}).get("ep") if same_owners else None
    in_state = [n.removeprefix(f"{STATE_DIR}/") for n in entries if n.startswith(f"{STATE_DIR}/")]
    names += [f"{STATE_DIR}/{n}" for n in expert_files_to_read(in_state, layout, rank, saved_ep)]
    return names


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint folder, a ``checkpoints`` folder or a run folder -> a verified checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    match = _STEP_DIR.match(path.name)
    if match:
        ckpt = Checkpoint(path, int(match.group(1)))
        problem = verify(ckpt)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return ckpt
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    ckpt = latest_good(root)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {root} (expected step_NNNNNN folders with a manifest.json)")
    return ckpt


# ---------------------------------------------------------------------------- load


def load_module_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The full, unsharded model state dict (no DeepSpeed engine needed), e.g. for `peer-dist eval`.

    Whatever layout wrote it: expert tables are assembled from their shards by global id.
    """
    if not (ckpt.path / STATE_DIR / DENSE_FILE).is_file():
        raise CheckpointError(f"checkpoint {ckpt.path} has no {STATE_DIR}/{DENSE_FILE}: not a peer_dist checkpoint "
                              "of this version")
    return full_model_state(ckpt.path / STATE_DIR)


def load_engine_state(ckpt: Checkpoint, engine: Any, layout: ParallelLayout, expert_layout: str | None = None) -> int:
    """Collective: restore model and optimizer into ``engine`` (any layout) and this rank's RNG.

    Reads exactly :func:`files_to_load` (what :func:`choose_checkpoint` verified on this
    rank). Returns the bytes this rank read (the files' sizes in the manifest). The RNG
    states come back only when this rank existed in the saving run (same world size);
    training itself draws no random numbers.
    """
    entries = _manifest_entries(ckpt)
    if isinstance(entries, str):
        raise CheckpointError(f"checkpoint {ckpt.path}: {entries}")
    names = files_to_load(ckpt, entries, layout, expert_layout)
    experts = {n.removeprefix(f"{STATE_DIR}/") for n in names if n.startswith(f"{STATE_DIR}/{EXPERTS_DIR}/")}
    load_portable(ckpt.path / STATE_DIR, engine, layout, expert_files=experts)
    if _rng_file(dist.get_rank()) in names:
        set_rng_state(torch.load(ckpt.path / _rng_file(dist.get_rank()), weights_only=False))
    return sum(entries[n]["bytes"] for n in names if n in entries)


def _rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
