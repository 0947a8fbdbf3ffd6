"""A trained model ready to use: from an export or from a run's checkpoint of any parallel layout.

Expert shards of a checkpoint are merged by global id (peer_dist/checkpoint/portable.py);
the model is put in eval mode, so the query BatchNorms of PEER and PKM layers normalise
with their running statistics, as at validation.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peer_dist.checkpoint.export import open_export
from peer_dist.checkpoint.store import load_module_state, resolve_checkpoint
from peer_dist.config import Config, from_dict, validate
from peer_dist.errors import CheckpointError, DataError, LaunchError
from peer_dist.model import TransformerLM, build_model


@dataclass
class LoadedModel:
    model: TransformerLM
    tokenizer: Any  # peer_dist.data.tokenizers.Tokenizer
    context_length: int  # tokens per training sample: the positions the model has seen
    step: int
    source: Path  # the export or checkpoint folder
    config: Config


def model_from_state(cfg: Config, weights: dict[str, torch.Tensor], source: Path) -> TransformerLM:
    """The unsharded LM of ``cfg`` holding ``weights`` (every name must match).

    A LoRA run's weights (train.lora_rank > 0) load into the adapted model, whose adapters are
    then merged into their base weights: the result is the plain model of ``cfg.model``.
    """
    from peer_dist.model.lora import apply_lora, merge_lora

    vocab = weights["embed.weight"].shape[0] if "embed.weight" in weights else cfg.model.vocab_size
    model = apply_lora(build_model(cfg.model, vocab), cfg.train)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {source} does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return merge_lora(model) if cfg.train.lora_rank else model


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """An export folder, or a run folder / checkpoints folder / step folder, in eval mode on ``device``."""
    export = open_export(Path(path))
    if export is not None:
        cfg = _config(export.config_dict())
        tokenizer, context = export.tokenizer(), export.context_length
        weights, step, source = export.state_dict(), export.step, export.path
    else:
        ckpt = resolve_checkpoint(path)
        cfg = _config(tomllib.loads((ckpt.path / "config.toml").read_text()))
        tokenizer, context = _run_tokenizer(cfg, ckpt.trainer_state().get("data_fingerprint"), ckpt.path)
        weights, step, source = load_module_state(ckpt), ckpt.step, ckpt.path
    if context is None:
        raise CheckpointError(f"export {source} does not record its context length (written by an older "
                              "version): re-export its checkpoint with `peer-dist export`")
    model = model_from_state(cfg, weights, source).to(device).eval()
    return LoadedModel(model, tokenizer, int(context), step, source, cfg)


def _config(raw: dict[str, Any]) -> Config:
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def _run_tokenizer(cfg: Config, fingerprint: str | None, source: Path) -> tuple[Any, int]:
    """The tokenizer and sequence length of the data a run trained on (still at its data.path)."""
    from peer_dist.data import Manifest
    from peer_dist.data.tokenizers import load_tokenizer

    try:
        manifest = Manifest.load(cfg.data.path)
    except DataError as exc:
        raise DataError(f"checkpoint {source} takes its tokenizer from the run's data, which is not readable "
                        f"({exc}); export the run with `peer-dist export RUN -o FOLDER --data PREPARED` and use "
                        "the export") from None
    if fingerprint and manifest.fingerprint != fingerprint:
        raise DataError(f"data at {cfg.data.path} is not the data checkpoint {source} was trained on (manifest "
                        "fingerprints differ), so its tokenizer may differ: export the run with --data and use "
                        "the export")
    return load_tokenizer(cfg.data.path), manifest.seq_len


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; a LaunchError for anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = name.removeprefix("cuda:") if name.startswith("cuda:") else ("0" if name == "cuda" else None)
    if index is None or not index.isdigit():
        raise LaunchError(f"--device {name!r} is not known; allowed: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        raise LaunchError(f"--device {name}: CUDA device {index} is not available here; use --device cpu or auto")
    return torch.device("cuda", int(index))
