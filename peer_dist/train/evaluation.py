"""`peer-dist eval`: validation loss, perplexity and expert metrics of a checkpoint.

Needs no DeepSpeed engine: the model is rebuilt from the checkpoint's config and its
full state dict. Runs as one process or under any launcher (the validation set is
split over the ranks and the sums are all-reduced).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import torch

from peer_dist.checkpoint.export import Export, open_export
from peer_dist.checkpoint.store import load_module_state, resolve_checkpoint
from peer_dist.config import from_dict, validate
from peer_dist.data import Manifest, val_batches
from peer_dist.errors import ConfigError, DataError
from peer_dist.log import get_logger, setup_logging
from peer_dist.inference.loading import model_from_state
from peer_dist.model.retrieval import batch_statistics
from peer_dist.parallel.env import detect_env, finish_distributed, init_distributed, pick_backend, pick_device
from peer_dist.train.metrics import evaluate


def run_eval(checkpoint: str | Path, data_path: str | None = None, batch_size: int | None = None,
             max_batches: int | None = None, device: str = "auto", split: str = "val",
             batch_stats: bool = False) -> dict[str, float]:
    """Loss, perplexity and expert metrics of a checkpoint on a split. ``batch_stats``: query
    BatchNorms normalise with each batch's own statistics, as in training (per rank), instead of
    their running statistics."""
    for flag, value in (("--batch-size", batch_size), ("--batches", max_batches)):
        if value is not None and value < 1:  # 0 batches would "evaluate" to perplexity 1.000
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    env = detect_env()
    setup_logging(env.rank)
    ckpt = open_export(Path(checkpoint)) or resolve_checkpoint(checkpoint)
    cfg = from_dict(tomllib.loads((ckpt.path / "config.toml").read_text()))
    validate(cfg)
    data_dir = data_path or cfg.data.path
    manifest = Manifest.load(data_dir, read_retries=cfg.data.read_retries, retry_wait_s=cfg.data.retry_wait_s)
    fingerprint = ckpt.data_fingerprint if isinstance(ckpt, Export) else ckpt.trainer_state().get("data_fingerprint")
    if data_path is None and fingerprint not in (None, manifest.fingerprint):
        raise DataError(f"data at {data_dir} is not the data the checkpoint was trained on "
                        "(manifest fingerprints differ); pass --data to evaluate on other data on purpose")
    torch_device = pick_device(device, env)
    init_distributed(env, pick_backend("auto", torch_device), device=torch_device)
    weights = ckpt.state_dict() if isinstance(ckpt, Export) else load_module_state(ckpt)
    vocab = weights["embed.weight"].shape[0] if "embed.weight" in weights else cfg.model.vocab_size
    # The model's vocabulary came from its training data (model.vocab_size = 0) or was set
    # larger: other data must use a tokenizer of the same size, or at most the set size.
    if manifest.vocab_size > vocab or (cfg.model.vocab_size == 0 and manifest.vocab_size != vocab):
        raise DataError(f"data at {data_dir} uses a tokenizer of {manifest.vocab_size} ids, the model of "
                        f"{ckpt.path} has {vocab}: evaluate on data prepared with the checkpoint's tokenizer")
    model = model_from_state(cfg, weights, ckpt.path).to(torch_device)
    batches = val_batches(data_dir, rank=env.rank, world=env.world,
                          batch_size=batch_size or cfg.train.micro_batch_size, max_batches=max_batches,
                          read_retries=cfg.data.read_retries, retry_wait_s=cfg.data.retry_wait_s, split=split)
    with batch_statistics(model, batch_stats):
        metrics = evaluate(model, batches, torch_device)
    metrics["step"] = float(ckpt.step)
    get_logger().info("evaluated %s", ckpt.path)
    if env.is_main:
        print(f"checkpoint: {ckpt.path}")
        what = "validation" if split == "val" else f"{split} split"
        stats = "  (query BatchNorm with batch statistics)" if batch_stats else ""
        print(f"{what} loss {metrics['val/loss']:.4f}  perplexity {metrics['val/perplexity']:.3f}{stats}")
        print("metrics: " + json.dumps({k: round(v, 5) for k, v in metrics.items()}))
    finish_distributed()
    return metrics


def run_usage(checkpoint: str | Path, output: str | Path, data_path: str | None = None,
              batch_size: int | None = None, max_batches: int = 50, device: str = "auto",
              batch_stats: bool = False) -> dict[str, Any]:
    """`peer-dist usage`: per PEER layer, expert retrievals and document frequencies over validation
    batches (the background or target statistics of sparse expert finetuning, train.sparse_experts),
    and a line per layer: usage, sub-key usage and the usage independent sub-key choices would reach."""
    from peer_dist.inference.loading import load_model
    from peer_dist.model.retrieval import independent_halves_usage, usage_metrics
    from peer_dist.train.sparse_experts import collect_usage

    output = Path(output)
    if output.exists():
        raise ConfigError(f"-o {output} exists; choose another file (nothing is overwritten)")
    if max_batches < 1 or (batch_size is not None and batch_size < 1):
        raise ConfigError("--batches and --batch-size must be >= 1")
    env = detect_env()
    setup_logging(env.rank)
    torch_device = pick_device(device, env)
    loaded = load_model(checkpoint, torch_device)
    data_dir = data_path or loaded.config.data.path
    init_distributed(env, pick_backend("auto", torch_device), device=torch_device)
    batches = (b.to(torch_device) for b in val_batches(
        data_dir, rank=env.rank, world=env.world, batch_size=batch_size or loaded.config.train.micro_batch_size,
        max_batches=max_batches, read_retries=loaded.config.data.read_retries,
        retry_wait_s=loaded.config.data.retry_wait_s))
    usage = collect_usage(loaded.model, batches, batch_stats=batch_stats)
    usage.update(source=str(loaded.source), data=str(data_dir))
    if env.is_main:
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.save(usage, output)
        used = {name: int(s["counts"].gt(0).sum()) for name, s in usage["layers"].items()}
        print(f"wrote {output}: {usage['batches']} batches, {usage['tokens']} tokens of {data_dir}; experts "
              f"retrieved per layer: {used}")
        stats = "batch statistics" if batch_stats else "running statistics"
        for name, layer in usage["layers"].items():
            counts = layer["counts"]
            metrics = usage_metrics(counts, counts)
            line = f"{name}: {counts.sum():.0f} retrievals, expert usage {metrics['expert_usage']:.2%}"
            if "subkey_usage" in metrics:
                line += (f", sub-key usage {metrics['subkey_usage']:.2%}, usage with independent sub-key "
                         f"choices {independent_halves_usage(counts):.2%}")
            print(f"{line} (query norm with {stats})")
    finish_distributed()
    return usage
