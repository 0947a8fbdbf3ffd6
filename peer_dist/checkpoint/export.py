"""Consolidated exports: the full, unsharded weights in safetensors plus the config.

    <output>/model.safetensors   every parameter and buffer under the unsharded model's names
                                 (expert tables whole), fp32; metadata: step, data fingerprint
    <output>/config.toml         the run's resolved config

`peer-dist eval <output>` loads it at any world size; so does ``safetensors.torch.load_file``
into ``peer_dist.model.build_model(cfg.model, vocab)``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from peer_dist.checkpoint.store import load_module_state, resolve_checkpoint
from peer_dist.errors import CheckpointError

WEIGHTS = "model.safetensors"
CONFIG = "config.toml"


@dataclass
class Export:
    path: Path
    step: int
    data_fingerprint: str | None

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.path / WEIGHTS)


def export_checkpoint(source: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write the export of a checkpoint (a run folder, its checkpoints/ or one step folder)."""
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(source)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"--output {output} is a file; give a folder for {WEIGHTS} and {CONFIG}")
    if (output / WEIGHTS).exists() and not overwrite:
        raise CheckpointError(f"{output} already holds an export; pass --overwrite to replace it")
    state = {name: t.detach().contiguous() for name, t in load_module_state(ckpt).items()}
    trainer_state = ckpt.trainer_state()
    metadata = {"step": str(ckpt.step), "data_fingerprint": str(trainer_state.get("data_fingerprint", "")),
                "source": str(ckpt.path)}
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(output / WEIGHTS)
    shutil.copyfile(ckpt.path / "config.toml", output / CONFIG)
    return output


def open_export(path: Path) -> Export | None:
    """The export at ``path``, or None when ``path`` is not an export folder."""
    if not (path / WEIGHTS).is_file():
        return None
    from safetensors import safe_open

    if not (path / CONFIG).is_file():
        raise CheckpointError(f"export {path} has {WEIGHTS} but no {CONFIG}; re-run `peer-dist export`")
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path / WEIGHTS} is not a readable safetensors file ({exc})") from None
    return Export(path, int(meta.get("step", 0)), meta.get("data_fingerprint") or None)
