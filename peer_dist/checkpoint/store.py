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

Commit protocol: every rank writes into ``.tmp-step_N/``; barrier (every rank has
finished writing); rank 0 fsyncs and hashes the files, writes and fsyncs the manifest,
renames the folder to ``step_N`` and replaces ``latest``; barrier. Resume takes the
newest folder whose manifest verifies. DeepSpeed's own checkpoint is not used: it
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from peer_dist.checkpoint.portable import DENSE_FILE, collect_portable, full_model_state, load_portable, write_files
from peer_dist.errors import CheckpointError
from peer_dist.fileio import fsync_path, sha256_file, write_atomic
from peer_dist.log import get_logger
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
                    on_phase: Callable[[str], None] | None = None, asynchronous: bool = False) -> Path:
    """Collective: every rank calls it. Returns the folder the checkpoint is (or will be) committed to.

    Synchronous: returns once the checkpoint is committed. Asynchronous: returns once the
    state is gathered and copied (the only collective part); a background thread per rank
    writes the files and leaves a marker, and rank 0's thread commits when every rank's
    marker is there. Until then the previous checkpoint is the newest valid one, so a crash
    during the write loses nothing committed. The next save (and the end of training)
    first waits for the pending one: :func:`wait_for_pending_save`.

    ``on_phase(phase)`` runs at "start" (before writing), "written" (this rank's files are
    on disk) and, on rank 0, "commit" (manifest written, folder not yet renamed): the
    fault-injection points.
    """
    on_phase = on_phase or (lambda _phase: None)
    wait_for_pending_save()
    rank = dist.get_rank()
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
    dist.barrier()  # the previous save is committed everywhere; tmp is fresh
    on_phase("start")
    files = {f"{STATE_DIR}/{k}": v for k, v in collect_portable(engine, layout, tp_group, copy=asynchronous).items()}
    files[f"rng/rank_{rank:05d}.pt"] = rng_state()
    texts = {STATE: json.dumps(trainer_state, indent=2, sort_keys=True), "config.toml": config_toml} if rank == 0 else {}
    if not asynchronous:
        _write_rank_files(tmp, files, texts, on_phase)
        dist.barrier()  # every rank has written its files
        if rank == 0:
            _commit(tmp, final, ckpt_root, on_phase)
            _prune(ckpt_root, keep)
        dist.barrier()
        return final

    def write_and_commit() -> None:
        _write_rank_files(tmp, files, texts, on_phase)
        (tmp / f".written-rank-{rank:05d}").touch()
        if rank == 0:
            _wait_for_markers(tmp, dist_world)
            for marker in tmp.glob(".written-rank-*"):
                marker.unlink()
            _commit(tmp, final, ckpt_root, on_phase)
            _prune(ckpt_root, keep)

    dist_world = dist.get_world_size()
    global _pending
    _pending = threading.Thread(target=write_and_commit, name=f"checkpoint-{step}", daemon=False)
    _pending.start()
    return final


_pending: threading.Thread | None = None
_MARKER_TIMEOUT_S = 3600.0


def wait_for_pending_save() -> None:
    """Block until this process's asynchronous save (if any) has written (rank 0: committed)."""
    global _pending
    if _pending is not None:
        _pending.join()
        _pending = None


def _write_rank_files(tmp: Path, files: dict[str, Any], texts: dict[str, str],
                      on_phase: Callable[[str], None]) -> None:
    write_files(tmp, files)
    for name, text in texts.items():
        (tmp / name).write_text(text)
    on_phase("written")


def _wait_for_markers(tmp: Path, world: int) -> None:
    deadline = time.monotonic() + _MARKER_TIMEOUT_S
    while len(list(tmp.glob(".written-rank-*"))) < world:
        if time.monotonic() > deadline:
            raise CheckpointError(f"asynchronous checkpoint {tmp}: not every rank wrote its files within "
                                  f"{_MARKER_TIMEOUT_S:g} s; it stays uncommitted")
        time.sleep(0.05)


def _commit(tmp: Path, final: Path, ckpt_root: Path, on_phase: Callable[[str], None]) -> None:
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for path in files:  # durable before the manifest says they are there
        fsync_path(path)
    manifest = {"files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                          for p in files}}
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    on_phase("commit")
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
    manifest_path = ckpt.path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the save did not complete)"
    try:
        entries = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest does not parse"
    for rel, meta in entries.items():
        path = ckpt.path / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != meta["bytes"]:
            return f"file {rel} has {path.stat().st_size} bytes, manifest says {meta['bytes']}"
        if sha256_file(path) != meta["sha256"]:
            return f"file {rel} fails its sha256 check"
    return None


def latest_good(ckpt_root: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    log = get_logger()
    for ckpt in list_checkpoints(ckpt_root):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s; falling back to the previous one", ckpt.path, problem)
    return None


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


def load_engine_state(ckpt: Checkpoint, engine: Any, layout: ParallelLayout) -> int:
    """Collective: restore model and optimizer into ``engine`` (any layout) and this rank's RNG.

    Returns Adam's step count. The RNG states come back only when this rank existed in
    the saving run (same world size); training itself draws no random numbers.
    """
    step_count = load_portable(ckpt.path / STATE_DIR, engine, layout)
    rng_file = ckpt.path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if ckpt.trainer_state().get("world") == dist.get_world_size() and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return step_count


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
