"""Checkpoints committed atomically, verified on load, with fall-back to the previous good one.

Layout under ``<run_dir>/checkpoints/``::

    step_000100/            one committed checkpoint
        ds/                 DeepSpeed engine state (module, optimizer shards, scheduler)
        rng/rank_00000.pt   each rank's RNG states (python, numpy, torch)
        trainer_state.json  step, consumed samples/tokens, config hash, data fingerprint
        config.toml         the resolved config of the run
        manifest.json       every file above with size and sha256 (written last, fsync'd)
    latest                  name of the newest committed checkpoint (atomic os.replace)

Commit protocol: every rank writes into ``.tmp-step_N/``; barrier (every rank has
finished writing); rank 0 hashes the files, writes and fsyncs the manifest, renames
the folder to ``step_N`` and replaces ``latest``; barrier. DeepSpeed's own ``latest``
file is not used (it is written without fsync before its final barrier).
The folder must be on a file system every rank sees (as for any multi-node trainer).
"""

from __future__ import annotations

import json
import os
import random
import re
import tomllib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from peer_dist.errors import CheckpointError
from peer_dist.fileio import fsync_dir, sha256_file, write_atomic
from peer_dist.log import get_logger

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
DS_TAG = "ds"


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
                    config_toml: str, keep: int) -> Path:
    """Collective: every rank calls it. Returns the committed folder."""
    rank = dist.get_rank()
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        (tmp / STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        (tmp / "config.toml").write_text(config_toml)
    dist.barrier()  # every rank has written its files
    if rank == 0:
        _commit(tmp, final, ckpt_root)
        _prune(ckpt_root, keep)
    dist.barrier()
    return final


def _commit(tmp: Path, final: Path, ckpt_root: Path) -> None:
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {"files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                          for p in files}}
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    if final.exists():  # a re-save of the same step (e.g. after a rollback) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
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

    Merges what a parallel run wrote: tensor-parallel shards of the dense weights
    (one ``mp_rank_NN_model_states.pt`` per TP rank) and the expert shards (one
    ``layer_L_expert_R_mp_rank_NN_model_states.pt`` per layer and EP rank), so the
    result loads into a model built with all experts.
    """
    folder = ckpt.path / DS_TAG
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {ckpt.path} has no model states under {DS_TAG}/")
    shards = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
    state = _merge_tp_shards(shards)
    expert_files = sorted(folder.glob("layer_*_expert_*_mp_rank_*_model_states.pt"))
    if expert_files:
        state.update(_merge_expert_shards(ckpt, expert_files))
    return state


def _merge_tp_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate AutoTP shards: column-parallel weights along dim 0, row-parallel along dim 1."""
    if len(shards) == 1:
        return dict(shards[0])
    from peer_dist.train.engine import TP_LAYER_SPECS

    merged = {}
    for key, first in shards[0].items():
        dim = None
        for spec in TP_LAYER_SPECS:
            if any(re.fullmatch(pattern, key) for pattern in spec["patterns"]):
                dim = 0 if spec["partition_type"] == "column" else 1
        merged[key] = first if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return merged


_EXPERT_KEY = re.compile(r"^(?P<module>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<shard>\d+)\.(?P<param>.+)$")


def _merge_expert_shards(ckpt: Checkpoint, files: list[Path]) -> dict[str, torch.Tensor]:
    """Expert shards (one file per layer and EP rank) -> full tables under the unsharded names."""
    from peer_dist.model.expert_tables import ExpertSharding

    config = tomllib.loads((ckpt.path / "config.toml").read_text())
    layout = config.get("parallel", {}).get("expert_layout", "permuted")
    pieces: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for f in files:
        for key, tensor in torch.load(f, map_location="cpu", weights_only=False).items():
            match = _EXPERT_KEY.match(key)
            if match is None:
                raise CheckpointError(f"{f} holds an unexpected expert key {key!r}")
            pieces.setdefault((match["module"], match["param"]), {})[int(match["shard"])] = tensor
    full = {}
    for (module, param), by_shard in pieces.items():
        ep = len(by_shard)
        rows = next(iter(by_shard.values())).shape[0]
        sharding = ExpertSharding(rows * ep, ep, 0, layout)
        table = torch.empty((rows * ep, *next(iter(by_shard.values())).shape[1:]),
                            dtype=next(iter(by_shard.values())).dtype)
        for shard, tensor in by_shard.items():
            table[sharding.global_ids(shard)] = tensor
        full[f"{module}.{param}"] = table
    return full


def load_engine_state(ckpt: Checkpoint, engine: Any) -> None:
    """Collective: restore module, optimizer and scheduler into ``engine``, and this rank's RNG."""
    load_path, _ = engine.load_checkpoint(str(ckpt.path), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the engine state from {ckpt.path / DS_TAG}")
    rng_file = ckpt.path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))


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
