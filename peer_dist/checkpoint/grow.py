"""`peer-dist grow`: a checkpoint becomes the first checkpoint of a new run with a larger PEER pool.

Shape suffixes: n sub-keys per half before, m after (N = n^2 -> M = m^2 experts),
C d_key // 2, D d_model.

Product-key ids are a * n + b (a, b: the sub-keys of the two halves). Growing keeps
sub-key a of each half at index a and appends m - n new sub-keys, so old expert
(a, b) becomes a * m + b and keeps its u and v rows, its Adam moments and its per-row
step count. What is new starts fresh (moments 0, row steps 0):

- new sub-keys ~ N(0, (key_scale / sqrt(d_key))^2): ``key_scale`` 1 is the scale of a
  freshly built layer's keys; smaller keys give the new experts lower scores, so they
  displace old experts from a token's top-k less often (the function changes less) and
  are retrieved, hence trained, less often at first;
- new u rows as a fresh layer draws them (N(0, 1/D), by global id from ``seed``);
- new v rows 0: a retrieved new expert adds nothing to the output; it changes the
  output only through the softmax mass it takes from the old experts of the top-k.

``peer-dist grow`` measures the change: validation loss of the checkpoint and of the
grown model on the same batches. Dense weights, buffers (the query BatchNorm
statistics), the step and the data position carry over unchanged, so training the
new run continues the old run's data order and learning-rate schedule; unless the new
run's ``data.path`` differs (a new phase on new data): then its checkpoint is step 0 on
that data, with a fresh schedule, and every Adam moment and row step count kept.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peer_dist.checkpoint.portable import DENSE_FILE, EXPERTS_DIR, OPT_KEYS
from peer_dist.checkpoint.store import Checkpoint, commit_offline, resolve_checkpoint
from peer_dist.config import Config, config_hash, dump_toml, from_dict, raw_with_overrides, validate
from peer_dist.errors import ConfigError
from peer_dist.model.expert_tables import init_rows_

TABLE_KEYS = ("param", *OPT_KEYS, "row_step")


@dataclass
class GrowResult:
    checkpoint: Path  # the new run's first checkpoint
    old_sub_keys: int  # n
    new_sub_keys: int  # m
    layers: list[str]  # PEER layers grown (their canonical names)


def grown_ids(ids: Tensor, old: int, new: int) -> Tensor:
    """Old global expert ids a * old + b -> their ids a * new + b after growth."""
    return torch.div(ids, old, rounding_mode="floor") * new + ids % old


def old_expert_mask(ids: Tensor, grown_from: int, num_sub_keys: int) -> Tensor:
    """True where global id a * num_sub_keys + b is an expert from before growth (a, b < grown_from)."""
    a, b = torch.div(ids, num_sub_keys, rounding_mode="floor"), ids % num_sub_keys
    return (a < grown_from) & (b < grown_from)


def grow_sub_keys(values: dict[str, Tensor], new: int, key_scale: float, generator: torch.Generator
                  ) -> dict[str, Tensor]:
    """Sub-keys (2, n, C) and their Adam moments -> (2, m, C): old rows kept, new keys drawn, new moments 0."""
    param = values["param"]
    halves, old, width = param.shape
    out = {}
    for key, value in values.items():
        grown = torch.zeros(halves, new, width, dtype=value.dtype)
        grown[:, :old] = value
        out[key] = grown
    d_key = 2 * width
    out["param"][:, old:] = torch.randn(halves, new - old, width, generator=generator) * key_scale * d_key**-0.5
    return out


def grow_table(entries: dict[str, dict[str, Tensor]], old: int, new: int, d_model: int, seed: int
               ) -> dict[str, dict[str, Tensor]]:
    """Full u/v tables (rows by global id, with moments and row steps) of n^2 experts -> m^2.

    ``entries``: {"u": {key: (n^2, D) or (n^2,)}, "v": ...} in global id order. Old rows
    move to their grown ids; new u rows get a fresh layer's draw, new v rows 0.
    """
    ids_new = grown_ids(torch.arange(old * old), old, new)
    is_new = torch.ones(new * new, dtype=torch.bool)
    is_new[ids_new] = False
    out: dict[str, dict[str, Tensor]] = {}
    for name, values in entries.items():
        grown = {key: torch.zeros((new * new, *v.shape[1:]), dtype=v.dtype) for key, v in values.items()}
        for key, value in values.items():
            grown[key][ids_new] = value
        if name == "u":
            fresh = torch.empty(int(is_new.sum()), d_model)
            # a fresh layer's u (PEER.reset_parameters): N(0, 1/D) drawn per global id
            init_rows_(fresh, is_new.nonzero().squeeze(1), new * new, seed, d_model**-0.5)
            grown["param"][is_new] = fresh
        out[name] = grown
    return out


def read_full_tables(state_dir: Path, step_count: int) -> dict[str, dict[str, dict[str, Tensor]]]:
    """{layer: {"u"|"v": {key: full tensor by global id}}} from every saved expert shard.

    A shard saved with dense table updates has no ``row_step``: rows with a non-zero
    second moment get the dense step count (as a resume does).
    """
    parts: dict[str, dict[str, list[dict[str, Tensor]]]] = {}
    for f in sorted((state_dir / EXPERTS_DIR).glob("*.ep*.pt")):
        layer = f.name.rsplit(".ep", 1)[0]
        for param, entry in torch.load(f, map_location="cpu", weights_only=False).items():
            if "row_step" not in entry:
                entry["row_step"] = torch.where(entry["exp_avg_sq"].ne(0).any(1), step_count, 0)
            parts.setdefault(layer, {}).setdefault(param, []).append(entry)
    out: dict[str, dict[str, dict[str, Tensor]]] = {}
    for layer, params in parts.items():
        for param, shards in params.items():
            rows = torch.cat([s["rows"] for s in shards])
            full = {}
            for key in TABLE_KEYS:
                values = torch.cat([s[key] for s in shards])
                full[key] = torch.empty_like(values)
                full[key][rows] = values
            out.setdefault(layer, {})[param] = full
    return out


def grown_config(ckpt: Checkpoint, num_experts: int, output: Path, overrides: list[str]) -> tuple[Config, int, int]:
    """The new run's config (``model.peer.num_experts``, ``model.peer.grown_from``, run folder, overrides)."""
    raw = tomllib.loads((ckpt.path / "config.toml").read_text())
    old_cfg = from_dict(raw)
    old = math.isqrt(old_cfg.model.peer.num_experts)
    if old_cfg.model.ffn != "peer" or not _has_special_blocks(old_cfg):
        raise ConfigError(f"checkpoint {ckpt.path} has no PEER layer (model.ffn = {old_cfg.model.ffn!r}); "
                          "add one with `peer-dist train --init-from EXPORT model.add_peer=...` instead")
    new = math.isqrt(num_experts)
    if new * new != num_experts or new <= old:
        raise ConfigError(f"--num-experts {num_experts} must be a perfect square m^2 larger than the checkpoint's "
                          f"{old}^2 = {old * old} experts (e.g. {(2 * old) ** 2})")
    raw = raw_with_overrides(raw, overrides)
    raw["model"]["peer"] = dict(raw["model"].get("peer", {}), num_experts=num_experts, grown_from=old)
    raw["run"] = dict(raw.get("run", {}), dir=str(output.parent), name=output.name)
    cfg = from_dict(raw)
    validate(cfg)
    return cfg, old, new


def _has_special_blocks(cfg: Config) -> bool:
    from peer_dist.config import resolve_ffn_blocks

    return bool(resolve_ffn_blocks(cfg.model.ffn_blocks, cfg.model.n_layers))


def grow_checkpoint(source: str | Path, num_experts: int, output: str | Path, overrides: list[str] | None = None,
                    key_scale: float = 0.5, seed: int = 0) -> GrowResult:
    """Write the grown copy of ``source``'s newest good checkpoint as run ``output``'s first checkpoint."""
    output = Path(output)
    if output.exists():
        raise ConfigError(f"-o {output} exists; growth writes a new run folder and overwrites nothing")
    if key_scale < 0:
        raise ConfigError(f"--key-scale must be >= 0, got {key_scale}")
    ckpt = resolve_checkpoint(source)
    cfg, old, new = grown_config(ckpt, num_experts, output, list(overrides or []))
    state_dir = ckpt.path / "state"
    dense = torch.load(state_dir / DENSE_FILE, map_location="cpu", weights_only=False)
    tables = read_full_tables(state_dir, dense["step_count"])
    generator = torch.Generator().manual_seed(seed)
    files: dict[str, Any] = {}
    for i, (table, entries) in enumerate(sorted(tables.items())):
        layer = table.removesuffix(".experts")
        keys = dense["params"][f"{layer}.sub_keys"]
        dense["params"][f"{layer}.sub_keys"] = grow_sub_keys(keys, new, key_scale, generator)
        grown = grow_table(entries, old, new, cfg.model.d_model, seed * 1_000_003 + i)
        for values in grown.values():
            values["rows"] = torch.arange(new * new)
        files[f"state/{EXPERTS_DIR}/{table}.ep000.pt"] = grown
    files[f"state/{DENSE_FILE}"] = dense
    state, step = ckpt.trainer_state(), ckpt.step
    state.update(config_hash=config_hash(cfg), expert_layout=cfg.parallel.expert_layout,
                 layout=dict(state.get("layout", {}), ep=1), grown_from=str(ckpt.path))
    old_data = tomllib.loads((ckpt.path / "config.toml").read_text()).get("data", {}).get("path")
    if cfg.data.path != old_data:  # a new phase on other data: its own step 0, data order and schedule
        from peer_dist.data import Manifest

        state.update(step=0, consumed_samples=0, consumed_tokens=0,
                     data_fingerprint=Manifest.load(cfg.data.path).fingerprint, data_skips={})
        step = 0
    texts = {"trainer_state.json": json.dumps(state, indent=2, sort_keys=True), "config.toml": dump_toml(cfg)}
    path = commit_offline(output / "checkpoints", step, files, texts)
    (output / "config.toml").write_text(dump_toml(cfg))
    layers = [t.removesuffix(".experts") for t in sorted(tables)]
    return GrowResult(path, old, new, layers)


def val_loss(ckpt: Checkpoint, batches: int, data: str | None = None) -> float:
    """Validation loss of checkpoint ``ckpt`` on the first ``batches`` validation batches of its data
    (one process; needs the default process group, see :func:`run_grow`)."""
    from peer_dist.checkpoint.store import load_module_state
    from peer_dist.data import val_batches
    from peer_dist.inference.loading import model_from_state
    from peer_dist.train.metrics import evaluate

    cfg = from_dict(tomllib.loads((ckpt.path / "config.toml").read_text()))
    model = model_from_state(cfg, load_module_state(ckpt), ckpt.path)
    stream = val_batches(data or cfg.data.path, rank=0, world=1, batch_size=cfg.train.micro_batch_size,
                         max_batches=batches, read_retries=cfg.data.read_retries, retry_wait_s=cfg.data.retry_wait_s)
    return evaluate(model, stream, torch.device("cpu"))["val/loss"]


def run_grow(source: str, num_experts: int, output: str, overrides: list[str], key_scale: float, seed: int,
             batches: int) -> tuple[GrowResult, float, float]:
    """`peer-dist grow`: grow, then the validation loss just before and just after (same batches)."""
    from peer_dist.log import setup_logging
    from peer_dist.parallel.env import detect_env, finish_distributed, init_distributed

    if batches < 1:
        raise ConfigError(f"--batches must be >= 1, got {batches}")
    env = detect_env()
    if env.world != 1:
        raise ConfigError("peer-dist grow runs as one process (not under a launcher)")
    setup_logging(env.rank)
    result = grow_checkpoint(source, num_experts, output, overrides, key_scale=key_scale, seed=seed)
    init_distributed(env, "gloo", device=torch.device("cpu"))
    try:  # both on the source run's data (the new run may name other data: a new phase)
        source_ckpt = resolve_checkpoint(source)
        data = from_dict(tomllib.loads((source_ckpt.path / "config.toml").read_text())).data.path
        before = val_loss(source_ckpt, batches, data)
        after = val_loss(resolve_checkpoint(result.checkpoint), batches, data)
    finally:
        finish_distributed()
    return result, before, after
