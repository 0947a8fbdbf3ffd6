"""Self-contained exports: everything needed to use a trained model without its run folder or data.

    <output>/model.safetensors   every parameter and buffer under the unsharded model's names
                                 (expert tables whole), fp32; metadata: step, data fingerprint
    <output>/config.toml         the run's resolved config, ``model.vocab_size`` set to the real size
    <output>/export.json         provenance and use: format version, step, data fingerprint, source
                                 checkpoint, vocabulary size, context length (the training
                                 sequence length), the tokenizer's manifest entry
    <output>/tokenizer.json      the BPE tokenizer (``tokenizers`` file); none for the byte tokenizer

`peer-dist eval | generate <output>` use it at any world size, `peer-dist train --init-from
<output>` fine-tunes it under any parallel layout, and ``safetensors.torch.load_file`` loads it
into ``peer_dist.model.build_model(cfg.model, vocab)``. The tokenizer comes from the prepared
data folder the run trained on (its manifest must carry the checkpoint's data fingerprint), or
from ``--data``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from peer_dist.checkpoint.store import Checkpoint, load_module_state, resolve_checkpoint
from peer_dist.errors import CheckpointError, DataError

WEIGHTS = "model.safetensors"
CONFIG = "config.toml"
INFO = "export.json"
FORMAT = "peer-dist-export"
FORMAT_VERSION = 1


@dataclass
class Export:
    path: Path
    step: int
    data_fingerprint: str | None
    info: dict[str, Any]  # export.json; {} for an export written before it existed

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.path / WEIGHTS)

    def config_dict(self) -> dict[str, Any]:
        return tomllib.loads((self.path / CONFIG).read_text())

    def tokenizer(self) -> Any:
        """The tokenizer the model was trained with (ByteTokenizer or BPETokenizer)."""
        from peer_dist.data.tokenizers import TOKENIZER_FILE, BPETokenizer, ByteTokenizer

        entry = self.info.get("tokenizer")
        if entry is None:
            raise CheckpointError(f"export {self.path} has no {INFO} (written by an older version): re-export its "
                                  "checkpoint with `peer-dist export` to get the tokenizer")
        if entry["name"] == "byte":
            return ByteTokenizer()
        tok = BPETokenizer.load(self.path / TOKENIZER_FILE, entry["name"], given=f"export {self.path}")
        if tok.vocab_size != entry["vocab_size"]:
            raise CheckpointError(f"{self.path / TOKENIZER_FILE} has {tok.vocab_size} ids, {INFO} says "
                                  f"{entry['vocab_size']}: the file was replaced after export")
        return tok

    @property
    def context_length(self) -> int | None:
        """Tokens per training sample (the positions the model has seen)."""
        return self.info.get("context_length")


def export_checkpoint(source: str | Path, output: str | Path, overwrite: bool = False,
                      data: str | None = None) -> Path:
    """Write the export of a checkpoint (a run folder, its checkpoints/ or one step folder)."""
    from safetensors.torch import save_file

    from peer_dist.data.manifest import read_bytes

    ckpt = resolve_checkpoint(source)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"--output {output} is a file; give a folder for {WEIGHTS} and {CONFIG}")
    if (output / WEIGHTS).exists() and not overwrite:
        raise CheckpointError(f"{output} already holds an export; pass --overwrite to replace it")
    fingerprint = str(ckpt.trainer_state().get("data_fingerprint", ""))
    manifest = _training_manifest(ckpt, fingerprint, data)
    state = {name: t.detach().contiguous() for name, t in plain_module_state(ckpt).items()}
    config = _config_with_vocab(ckpt.path / CONFIG, state["embed.weight"].shape[0])
    info = {"format": FORMAT, "version": FORMAT_VERSION, "step": ckpt.step, "data_fingerprint": fingerprint,
            "source": str(ckpt.path), "vocab_size": int(state["embed.weight"].shape[0]),
            "context_length": manifest.seq_len, "tokenizer": dict(manifest.info["tokenizer"])}
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"step": str(ckpt.step), "data_fingerprint": fingerprint,
                                         "source": str(ckpt.path)})
    tmp.replace(output / WEIGHTS)
    (output / CONFIG).write_text(config)
    if "file" in info["tokenizer"]:  # BPE or a given tokenizers file (the data may be remote)
        name = info["tokenizer"]["file"]
        (output / name).write_bytes(read_bytes(manifest.location(name)))
    (output / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return output


def _training_manifest(ckpt: Checkpoint, fingerprint: str, data: str | None) -> Any:
    """The manifest of the data the run trained on (its tokenizer and sequence length).

    Without ``data``: the run's ``data.path``, which must still hold the checkpoint's data
    (same fingerprint). With it: any prepared folder, on purpose (e.g. the data moved).
    """
    from peer_dist.config import from_dict
    from peer_dist.data import Manifest

    path = data or from_dict(tomllib.loads((ckpt.path / CONFIG).read_text())).data.path
    try:
        manifest = Manifest.load(path)
    except DataError as exc:
        raise DataError(f"the export takes its tokenizer from the run's prepared data, which is not readable "
                        f"({exc}); pass --data FOLDER, a prepared folder with the same tokenizer") from None
    if data is None and fingerprint and manifest.fingerprint != fingerprint:
        raise DataError(f"data at {path} is not the data checkpoint {ckpt.path} was trained on (manifest "
                        "fingerprints differ): pass --data FOLDER, a prepared folder with the run's tokenizer")
    return manifest


def plain_module_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's unsharded weights; a LoRA run's (train.lora_rank > 0) with the adapters merged
    into their base weights, under the plain model's names."""
    from peer_dist.config import from_dict
    from peer_dist.inference.loading import model_from_state

    state = load_module_state(ckpt)
    cfg = from_dict(tomllib.loads((ckpt.path / CONFIG).read_text()))
    if not cfg.train.lora_rank:
        return state
    return model_from_state(cfg, state, ckpt.path).state_dict()


def _config_with_vocab(config_path: Path, vocab: int) -> str:
    """The checkpoint's config with ``model.vocab_size`` = the trained vocabulary (not 0 = from the data);
    train.lora_rank = 0, since the export's weights have any adapters merged (:func:`plain_module_state`)."""
    from peer_dist.config import dump_toml, from_dict

    cfg = from_dict(tomllib.loads(config_path.read_text()))
    cfg.model.vocab_size = int(vocab)
    cfg.train.lora_rank = 0
    return dump_toml(cfg)


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
    info = json.loads((path / INFO).read_text()) if (path / INFO).is_file() else {}
    return Export(path, int(meta.get("step", 0)), meta.get("data_fingerprint") or None, info)


def require_export(path: str | Path, flag: str) -> Export:
    """The export at ``path`` or a CheckpointError naming ``flag``."""
    export = open_export(Path(path))
    if export is None:
        hint = " (that is a run folder: export it first with `peer-dist export`)" if Path(path, CONFIG).is_file() \
            else ""
        raise CheckpointError(f"{flag} {path}: no export there (no {WEIGHTS}){hint}")
    return export


# ---------------------------------------------------------------------------- fine-tuning from an export


def load_export_into(model: torch.nn.Module, export: Export, added: set[str] = frozenset()) -> None:
    """Copy the export's weights and buffers into ``model``, which may hold only expert shards.

    ``model`` is the unwrapped LM as the trainer builds it (parameter names of the unsharded
    model): every expert-table parameter takes the rows of its shard by global expert id,
    every other tensor is copied whole (AutoTP and ZeRO partition them afterwards).
    ``added``: state-dict names of layers this model adds (model.add_peer); the export does
    not have them and they keep their initialisation.
    """
    from safetensors import safe_open

    with safe_open(str(export.path / WEIGHTS), framework="pt") as fh:
        load_weights_into(model, set(fh.keys()), fh.get_tensor, export.path, added)


def load_weights_into(model: torch.nn.Module, saved: set[str], get: Callable[[str], torch.Tensor], source: Path,
                      added: set[str] = frozenset()) -> None:
    """Copy tensors ``get(name)`` (the unsharded model's, names ``saved``) into ``model``; see load_export_into."""
    row_ids = _expert_row_ids(model)
    own = {name: t for name, t in model.state_dict().items() if name not in added}
    missing = sorted(set(own) - saved)
    if missing:
        raise CheckpointError(f"{source} has no tensor {missing[0]} ({len(missing)} missing): another model")
    with torch.no_grad():
        for name, target in own.items():
            value = get(name)  # one tensor in memory at a time
            if name in row_ids:
                value = value[row_ids[name]]
            if value.shape != target.shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, this "
                                      f"model {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


def _expert_row_ids(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state-dict name -> global ids of the rows this process holds, for every expert-table tensor."""
    out = {}
    for module_name, module in model.named_modules():
        sharding = getattr(module, "sharding", None)
        if sharding is not None and hasattr(sharding, "global_ids"):
            for param_name, _ in module.named_parameters(recurse=False):
                out[f"{module_name}.{param_name}"] = sharding.global_ids()
    return out
