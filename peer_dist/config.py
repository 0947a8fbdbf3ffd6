"""Typed configuration: nested dataclasses, a TOML/YAML file, dotted CLI overrides.

Merge order: defaults < file < command-line overrides (``model.d_model=128``). The
defaults are a small PEER model that trains in minutes on a CPU (what configs/tiny.toml
spells out); the paper-scale settings are presets in configs/.
Unknown keys and bad values raise :class:`~peer_dist.errors.ConfigError` naming the
key and what is allowed. The resolved config is written into the run folder, and
its hash (:func:`config_hash`) identifies the run for resume checks.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peer_dist.errors import ConfigError
from peer_dist.specs import parse_faults, parse_signal


def _choice(default: Any, choices: tuple[Any, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def _at_least(default: Any, minimum: float) -> Any:
    return field(default=default, metadata={"min": minimum})


@dataclass
class PEERConfig:
    """The PEER layer (paper section 2). The defaults are a small CPU-sized layer (N = 128², h = 4,
    k = 8); the paper's N = 1024², h = 8, k = 16, d_key 128 are in configs/paper_peer.toml."""

    num_experts: int = _at_least(128 * 128, 1)
    heads: int = _at_least(4, 1)
    topk: int = _at_least(8, 1)
    d_key: int = _at_least(64, 2)
    activation: str = _choice("gelu", ("gelu", "relu"))
    query_norm: str = _choice("batchnorm", ("batchnorm", "layernorm", "none"))
    # Expert-compute kernel: "auto" = the fused Triton kernels on CUDA (when triton is installed),
    # the torch path elsewhere; "triton", "fused" or "chunked" force one (see peer_dist/model/peer.py).
    kernel: str = _choice("auto", ("auto", "fused", "chunked", "triton"))
    # Sub-keys per half before the last `peer-dist grow` (which sets it; 0: never grown): the
    # experts a * n + b with a, b below it are the old ones (train.old_expert_lr_scale).
    grown_from: int = _at_least(0, 0)


@dataclass
class MoEConfig:
    """Coarse-grained MoE baseline (Switch / GLaM / Mixtral family): E dense-MLP experts, token-choice top-k."""

    num_experts: int = _at_least(8, 1)
    topk: int = _at_least(2, 1)
    d_expert: int = _at_least(0, 0)  # hidden width of each expert MLP; 0: model.d_ff
    aux_loss_coef: float = _at_least(0.01, 0.0)  # Switch load-balancing loss weight
    z_loss_coef: float = _at_least(0.001, 0.0)  # ST-MoE router z-loss weight


@dataclass
class PKMConfig:
    """Product-key memory baseline (Lample et al. 2019): a value table read with softmax weights."""

    num_values: int = _at_least(128 * 128, 1)  # a perfect square n * n
    heads: int = _at_least(4, 1)
    topk: int = _at_least(8, 1)
    d_key: int = _at_least(64, 2)
    query_norm: str = _choice("batchnorm", ("batchnorm", "layernorm", "none"))


@dataclass
class ModelConfig:
    """Decoder-only transformer; ``ffn`` picks the feed-forward kind of the blocks in ``ffn_blocks``."""

    vocab_size: int = _at_least(0, 0)  # 0: take it from the prepared data's tokenizer
    d_model: int = _at_least(128, 8)
    n_layers: int = _at_least(4, 1)
    n_heads: int = _at_least(4, 1)
    d_ff: int = _at_least(512, 1)  # hidden width of the dense FFN blocks
    mlp: str = _choice("gelu", ("gelu", "swiglu"))
    ffn: str = _choice("peer", ("peer", "dense", "moe", "pkm"))
    # Which blocks use `ffn` (the rest are dense): "middle" (the paper), "all", "none" or a list of block indices.
    ffn_blocks: str | list[int] = "middle"
    # PEER layers added to a trained model (train.init_from): "residual" = beside the block's FFN, its
    # output starting at exactly 0; "replace" = instead of the (dense) FFN; in the blocks add_peer_blocks.
    add_peer: str = _choice("none", ("none", "residual", "replace"))
    add_peer_blocks: str | list[int] = "middle"  # as ffn_blocks
    tie_embeddings: bool = True
    rope_theta: float = _at_least(10000.0, 1.0)
    init_std: float = _at_least(0.02, 0.0)
    peer: PEERConfig = field(default_factory=PEERConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    pkm: PKMConfig = field(default_factory=PKMConfig)


@dataclass
class DataConfig:
    path: str = "data/stdlib-byte"  # folder written by `peer-dist prepare`
    num_workers: int = _at_least(0, 0)
    bad_shard: str = _choice("error", ("error", "skip"))
    # Check every shard's size and sha256 against the manifest when it is read (true), not (false),
    # or also every shard of this rank's share before step 1 ("upfront", see peer_dist/data/verify.py).
    verify: bool | str = _choice(True, (True, False, "upfront"))
    read_retries: int = _at_least(3, 0)  # re-reads of a shard whose read failed (remote: dropped connection)
    retry_wait_s: float = _at_least(0.5, 0.0)  # wait before the first retry, doubled for each further one
    # What validation (the val/* metrics) evaluates on: the validation split, or the tuning split of data
    # prepared with --tune-fraction (hyperparameter search kept apart from the reported split).
    eval_split: str = _choice("val", ("val", "tune"))
    # Training sample order: shards are visited in a shuffled order, this many at a time, and the
    # samples of those shards are shuffled together, so every batch mixes this many stretches of the
    # corpus (peer_dist/data/order.py). 1 = one shard at a time (the order before this key existed).
    # Memory: shuffle_shards + 1 decoded shards per loader process.
    shuffle_shards: int = _at_least(16, 1)


@dataclass
class TrainConfig:
    micro_batch_size: int = _at_least(16, 1)  # samples per rank per micro-step
    grad_accum: int = _at_least(1, 1)
    max_steps: int = _at_least(300, 1)
    lr: float = _at_least(2e-3, 0.0)
    min_lr_ratio: float = _at_least(0.1, 0.0)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = _at_least(30, 0)
    weight_decay: float = _at_least(0.1, 0.0)
    beta1: float = _at_least(0.9, 0.0)
    beta2: float = _at_least(0.95, 0.0)
    eps: float = _at_least(1e-8, 0.0)
    grad_clip: float = _at_least(1.0, 0.0)  # 0 disables clipping
    # Gradients and update of the expert tables (PEER u/v, PKM values): "sparse" = row-sparse
    # gradients, reduction and AdamW over the rows a step retrieved (a row's own Adam step count;
    # every ZeRO stage and precision), or "dense" = (N, D) gradients through DeepSpeed's AdamW.
    expert_update: str = _choice("sparse", ("sparse", "dense"))
    # Peak learning rate of the expert tables (PEER u/v, PKM values) relative to train.lr.
    table_lr_scale: float = _at_least(1.0, 0.0)
    # After `peer-dist grow`: learning rate of the old experts' u/v rows relative to the tables'
    # (0 freezes them: their rows and moments stay bit-identical). Needs expert_update = "sparse".
    old_expert_lr_scale: float = _at_least(1.0, 0.0)
    # Which parameters train: "all", or "peer" (only the PEER layers; every other weight frozen).
    # "added": only the layers of model.add_peer (everything loaded by train.init_from frozen).
    # "experts": only the PEER expert tables (u, v).
    trainable: str = _choice("all", ("all", "peer", "added", "experts"))
    # Sparse expert finetuning (peer_dist/train/sparse_experts.py): update only the top-t experts per
    # PEER layer by TF-IDF of their usage against background statistics (`peer-dist usage`); 0: off.
    sparse_experts: int = _at_least(0, 0)
    sparse_experts_background: str = ""  # usage file of the background (pretraining) data
    # "step": rank each step's own batch; "phase": one selection from sparse_experts_target.
    sparse_experts_select: str = _choice("step", ("step", "phase"))
    sparse_experts_target: str = ""  # usage file of the new data ("phase")
    # LoRA (Hu et al. 2021) on a dense model, through the peft library (the [lora] extra): every Linear
    # named in lora_targets gets W x + (alpha / rank) B A x with B = 0 at the start; only A and B train.
    lora_rank: int = _at_least(0, 0)  # 0: off
    lora_alpha: float = _at_least(16.0, 0.0)
    lora_targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "fc_in", "fc_out"])
    zero_stage: int = _choice(0, (0, 1, 2))
    precision: str = _choice("fp32", ("fp32", "bf16"))
    seed: int = 0
    # An export folder (`peer-dist export`): a run without a checkpoint starts from its weights
    # (fine-tuning, any parallel layout; the model section defaults to the export's, see load_config).
    init_from: str = ""
    log_interval: int = _at_least(20, 1)
    eval_interval: int = _at_least(100, 0)  # 0: only at the end
    eval_batches: int = _at_least(10, 1)  # per rank
    ckpt_interval: int = _at_least(100, 0)  # 0: only at the end
    ckpt_keep: int = _at_least(3, 1)  # committed checkpoints kept (older ones are deleted after a commit)
    async_save: bool = False  # write interval checkpoints in the background (the final one is synchronous)
    device: str = _choice("auto", ("auto", "cpu", "cuda"))
    backend: str = _choice("auto", ("auto", "gloo", "nccl"))
    # Bound on the rendezvous and on every collective: a stalled or dead rank makes the job exit
    # non-zero after this long instead of hanging.
    collective_timeout_s: float = _at_least(600.0, 1.0)
    progress: bool = True  # progress bar on rank 0
    peak_flops: float = _at_least(0.0, 0.0)  # peak FLOP/s of one rank's device, for train/mfu (0: not logged)
    # Signals that stop training cleanly: finish the step, checkpoint, exit 75 (requeue under Slurm).
    # SIGINT is Ctrl-C; a second Ctrl-C aborts at once (exit 130).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])


@dataclass
class GuardConfig:
    """Bad-step protection: NaN/Inf or spiking losses are skipped on every rank alike."""

    enabled: bool = True
    spike_factor: float = _at_least(0.0, 0.0)  # a loss above factor x the running mean is bad (0: off)
    spike_window: int = _at_least(20, 1)  # steps in the running mean; no spike check before it fills
    max_bad_steps: int = _at_least(3, 1)  # after this many bad steps: roll back to the last good checkpoint


@dataclass
class FaultsConfig:
    """Fault injection for tests and drills (also PEER_DIST_FAULTS in the environment): see faults.py."""

    inject: list[str] = field(default_factory=list)  # e.g. ["crash:step=5:rank=1", "nan:step=3"]


@dataclass
class ParallelConfig:
    """Parallel layout (see peer_dist/parallel/layout.py): data parallel fills world / tp."""

    ep: int = _at_least(1, 1)  # expert-parallel size: each PEER/MoE layer's experts split over ep ranks
    tp: int = _at_least(1, 1)  # tensor-parallel size: attention and dense MLPs split over tp ranks (AutoTP)
    expert_layout: str = _choice("permuted", ("permuted", "contiguous"))  # which rank owns which expert id


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs"  # the run folder is <dir>/<name>
    tensorboard: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < file (TOML or YAML) < ``section.key=value`` overrides; validated.

    With ``train.init_from`` the export's model section sits between the defaults and the
    file: a fine-tuning run needs no model settings, and one that sets a model key to
    another value than the export's is refused at set-up (:func:`model_differences`).
    """
    raw = raw_with_overrides(_read_file(Path(path)) if path is not None else {}, overrides)
    init_from = raw.get("train", {}).get("init_from") if isinstance(raw.get("train"), dict) else None
    if init_from:
        raw["model"] = _merged(export_model_section(str(init_from)), raw.get("model", {}))
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def raw_with_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``raw`` (nested sections, not yet checked) with ``section.key=value`` overrides applied."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(raw, key, value)
    return raw


def export_model_section(folder: str) -> dict[str, Any]:
    """The ``[model]`` section of an export's config.toml (``train.init_from``)."""
    path = Path(folder) / "config.toml"
    if not path.is_file():
        raise ConfigError(f"train.init_from={folder}: no export there ({path} is missing); write one with "
                          "`peer-dist export RUN --output FOLDER`")
    try:
        model = tomllib.loads(path.read_text()).get("model", {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"train.init_from={folder}: {path} does not parse ({exc})") from None
    return model if isinstance(model, dict) else {}


def _merged(base: dict[str, Any], top: Any) -> Any:
    """``top`` over ``base``, section by section (dicts merge, values replace)."""
    if not isinstance(top, dict):
        return top
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(base[key], value) if isinstance(base.get(key), dict) else value
    return out


# Model keys that may differ from an export's when fine-tuning from it: where the same
# math runs (kernel) and how weights would be initialised (they come from the export).
INIT_SAFE_MODEL_KEYS = ("peer.kernel", "init_std")


def model_differences(export_model: dict[str, Any], model: ModelConfig) -> list[str]:
    """``"model.key: export -> this run"`` for every model key outside INIT_SAFE_MODEL_KEYS that differs.

    Adding PEER layers (model.add_peer) may set the add_peer keys, and the model.peer keys
    when the export itself has no PEER layer (they then describe only the added ones).
    """
    exported = from_dict(export_model, ModelConfig, "model.")
    saved = _flat(dataclasses.asdict(exported))
    now = _flat(dataclasses.asdict(model))
    safe = list(INIT_SAFE_MODEL_KEYS)
    if model.add_peer != "none" and exported.add_peer == "none":
        safe += ["add_peer", "add_peer_blocks"]
        if exported.ffn != "peer" or not resolve_ffn_blocks(exported.ffn_blocks, exported.n_layers):
            safe += [key for key in saved if key.startswith("peer.")]
    return [f"model.{key}: {saved[key]!r} -> {now[key]!r}" for key in sorted(saved)
            if key not in safe and saved[key] != now[key]]


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: unknown format {path.suffix!r}; allowed: .toml, .yaml, .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of sections, got {type(data).__name__}")
    return data


class _CliText(str):
    """An override's text; parsed against the field's type in :func:`_coerce`."""


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. model.d_model=128)")
    key, text = item.split("=", 1)
    return key.strip(), _CliText(text.strip())


def _parse_cli(text: str, option: Any) -> Any:
    """Parse override text as ``option`` (a type); raises ValueError when it does not fit."""
    if option is str:
        return str(text)
    if option is bool:
        lowered = text.lower()
        if lowered not in ("true", "false"):
            raise ValueError(text)
        return lowered == "true"
    if option in (int, float):
        return option(text)
    parsed = yaml.safe_load(text)  # lists: [1, 2]
    if not isinstance(parsed, list):
        raise ValueError(text)
    return parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts; unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} ({where} allows: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix}{name} is a section; set its keys, e.g. {prefix}{name}.<key>=...")
            kwargs[name] = from_dict(value, hint, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field type; ints are accepted for floats."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if isinstance(value, _CliText):
        # Try the more specific types first so "[1, 2]" is a list and "128" an int, not a str.
        for option in sorted(options, key=lambda o: o is str):
            try:
                value = _parse_cli(value, typing.get_origin(option) or option)
                break
            except (ValueError, yaml.YAMLError):
                continue
    for option in options:
        origin = typing.get_origin(option)
        if origin is list:
            (item_type,) = typing.get_args(option)
            if isinstance(value, list) and all(_is_type(v, item_type) for v in value):
                return list(value)
        elif _is_type(value, option):
            return float(value) if option is float else value
    allowed = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"config key {key} = {value!r}: expected {allowed}")


def _is_type(value: Any, typ: Any) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _type_name(option: Any) -> str:
    if typing.get_origin(option) is list:
        return f"a list of {typing.get_args(option)[0].__name__}"
    return "a number" if option is float else getattr(option, "__name__", str(option))


# ---------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Per-field choices and minimums, then cross-field rules."""
    _validate_fields(cfg, "")
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"model.d_model / model.n_heads = {m.d_model // m.n_heads} must be even (RoPE rotates pairs)")
    resolve_ffn_blocks(m.ffn_blocks, m.n_layers)
    if not 0 <= cfg.train.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={cfg.train.min_lr_ratio} must be between 0 and 1")
    _validate_parallel(cfg)
    parse_faults(cfg.faults)  # a bad fault spec (config or PEER_DIST_FAULTS) stops the run before any work
    for name in cfg.train.stop_signals:
        try:
            parse_signal(name)
        except ConfigError as exc:
            raise ConfigError(f"train.stop_signals: {exc}") from None
    _validate_growth(cfg)
    if not cfg.run.name or "/" in cfg.run.name:
        raise ConfigError(f"run.name={cfg.run.name!r} must be a non-empty folder name without '/'")


def _validate_growth(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    added = resolve_ffn_blocks(m.add_peer_blocks, m.n_layers) if m.add_peer != "none" else []
    special = set(resolve_ffn_blocks(m.ffn_blocks, m.n_layers)) if m.ffn != "dense" else set()
    if m.add_peer == "replace" and special & set(added):
        raise ConfigError(f"model.add_peer = \"replace\" replaces dense FFNs; blocks {sorted(special & set(added))} "
                          f"already use model.ffn = {m.ffn!r} (use \"residual\" there, or other add_peer_blocks)")
    if added and cfg.parallel.ep > 1 and m.peer.num_experts % cfg.parallel.ep:
        raise ConfigError(f"model.peer.num_experts={m.peer.num_experts} must be divisible by parallel.ep="
                          f"{cfg.parallel.ep}")
    if t.sparse_experts and not (t.sparse_experts_background and t.expert_update == "sparse"):
        raise ConfigError("train.sparse_experts needs train.sparse_experts_background (a file of `peer-dist usage`) "
                          "and train.expert_update = \"sparse\"")
    if t.sparse_experts and t.sparse_experts_select == "phase" and not t.sparse_experts_target:
        raise ConfigError("train.sparse_experts_select = \"phase\" needs train.sparse_experts_target (a file of "
                          "`peer-dist usage` on the new data)")
    if t.trainable == "experts" and (t.zero_stage or t.precision != "fp32"):
        raise ConfigError("train.trainable = \"experts\" trains no dense weight, so there is no dense optimizer "
                          "state to partition: use train.zero_stage = 0 and train.precision = \"fp32\"")
    if t.trainable == "added" and not added:
        raise ConfigError("train.trainable = \"added\" needs model.add_peer = \"residual\" or \"replace\"")
    if m.peer.grown_from and m.peer.grown_from ** 2 >= m.peer.num_experts:
        raise ConfigError(f"model.peer.grown_from={m.peer.grown_from} must be below sqrt(model.peer.num_experts) "
                          f"= {m.peer.num_experts ** 0.5:g} (it is written by `peer-dist grow`)")
    if t.old_expert_lr_scale != 1.0 and not (m.ffn == "peer" and m.peer.grown_from):
        raise ConfigError("train.old_expert_lr_scale needs a grown PEER model (model.peer.grown_from > 0): "
                          "make one with `peer-dist grow RUN --num-experts M -o NEW_RUN`")
    if t.old_expert_lr_scale != 1.0 and t.expert_update != "sparse":
        raise ConfigError("train.old_expert_lr_scale needs train.expert_update = \"sparse\" (row updates)")
    _validate_lora(cfg)


# Linear layers LoRA may adapt (peer_dist/model/lora.py): attention projections and dense MLP matrices.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "fc_in", "fc_gate", "fc_out")


def _validate_lora(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    if not t.lora_rank:
        return
    unknown = [name for name in t.lora_targets if name not in LORA_TARGETS]
    if unknown or not t.lora_targets:
        raise ConfigError(f"train.lora_targets = {t.lora_targets!r}: give one or more of {', '.join(LORA_TARGETS)}")
    if "fc_gate" in t.lora_targets and m.mlp != "swiglu":
        raise ConfigError("train.lora_targets names fc_gate, which only model.mlp = \"swiglu\" has")
    special = resolve_ffn_blocks(m.ffn_blocks, m.n_layers) if m.ffn != "dense" else []
    if special or m.add_peer != "none":
        raise ConfigError(f"train.lora_rank = {t.lora_rank} adapts a dense model; this one has model.ffn = {m.ffn!r} "
                          f"in blocks {special}{' and added PEER layers' if m.add_peer != 'none' else ''} "
                          "(use model.ffn = \"dense\", or train.trainable / train.sparse_experts for PEER models)")
    if t.trainable != "all" or t.sparse_experts:
        raise ConfigError("train.lora_rank > 0 trains only the LoRA adapters: leave train.trainable = \"all\" and "
                          "train.sparse_experts = 0")
    if cfg.parallel.tp > 1:
        raise ConfigError(f"train.lora_rank > 0 does not combine with parallel.tp = {cfg.parallel.tp} (tensor "
                          "parallelism would split the adapters' base layers); use parallel.tp = 1")
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError("train.lora_rank > 0 needs the peft library, which is not installed: "
                          "pip install -e '.[lora]' (launch/setup.sh installs it)")


def _validate_parallel(cfg: Config) -> None:
    """Checks that need no world size (the layout itself is checked at launch)."""
    m, par = cfg.model, cfg.parallel
    has_special = bool(resolve_ffn_blocks(m.ffn_blocks, m.n_layers))
    if par.ep > 1 and has_special and m.ffn == "peer" and m.peer.num_experts % par.ep:
        raise ConfigError(f"model.peer.num_experts={m.peer.num_experts} must be divisible by parallel.ep={par.ep}")
    if par.ep > 1 and has_special and m.ffn == "pkm" and m.pkm.num_values % par.ep:
        raise ConfigError(f"model.pkm.num_values={m.pkm.num_values} must be divisible by parallel.ep={par.ep}")
    if par.ep > 1 and has_special and m.ffn == "moe" and m.moe.num_experts % par.ep:
        raise ConfigError(f"model.moe.num_experts={m.moe.num_experts} must be divisible by parallel.ep={par.ep}")
    if m.ffn == "moe" and m.moe.topk > m.moe.num_experts:
        raise ConfigError(f"model.moe.topk={m.moe.topk} must be at most model.moe.num_experts={m.moe.num_experts}")
    if par.tp > 1:
        if m.n_heads % par.tp or m.d_ff % par.tp:
            raise ConfigError(f"parallel.tp={par.tp} must divide model.n_heads={m.n_heads} and model.d_ff={m.d_ff}")


def _validate_fields(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _validate_fields(value, f"{key}.")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"config key {key} = {value!r}: allowed values are {', '.join(map(repr, choices))}")
        minimum = f.metadata.get("min")
        if minimum is not None and value < minimum:
            raise ConfigError(f"config key {key} = {value!r}: must be >= {minimum}")


def resolve_ffn_blocks(spec: str | list[int], n_layers: int) -> list[int]:
    """Block indices that get ``model.ffn``: "middle" is block n_layers // 2 (the paper's choice)."""
    if isinstance(spec, list):
        bad = [i for i in spec if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"model.ffn_blocks has block index {bad[0]}; allowed: 0..{n_layers - 1}")
        return sorted(set(spec))
    table = {"middle": [n_layers // 2], "all": list(range(n_layers)), "none": []}
    if spec not in table:
        raise ConfigError(f"model.ffn_blocks = {spec!r}: allowed are 'middle', 'all', 'none' or a list of block indices")
    return table[spec]


# ---------------------------------------------------------------------------- output


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Keys that may change between a run and its resume without mixing incompatible runs.
RESUME_SAFE_KEYS = (
    "run", "train.max_steps", "train.log_interval", "train.eval_interval", "train.eval_batches",
    "train.ckpt_interval", "train.ckpt_keep", "train.async_save", "train.progress", "train.peak_flops", "train.collective_timeout_s", "data.num_workers", "data.verify", "data.path",
    "data.eval_split",
    "parallel",  # the layout is checked against the checkpoint's separately (resharding decides)
    "guard", "faults", "data.read_retries", "data.retry_wait_s",
    # How the global batch is split may change (elastic resume); the global batch itself is checked.
    "train.micro_batch_size", "train.grad_accum",
    # Where and with which kernels the same math runs: a checkpoint written on CUDA resumes on CPU and back.
    "train.device", "train.backend", "model.peer.kernel",
    # Read only when the run has no checkpoint yet; a resume continues from its own weights.
    "train.init_from",
)


# Keys added after runs were checkpointed, with the value that leaves a run as it was (their default,
# except data.shuffle_shards): at that value they are left out of the hash, so a checkpoint written
# before they existed still resumes with it.
HASHED_UNLESS_DEFAULT = {
    "data.shuffle_shards": 1,
    "model.peer.grown_from": 0, "model.add_peer": "none", "model.add_peer_blocks": "middle",
    "train.old_expert_lr_scale": 1.0, "train.trainable": "all", "train.sparse_experts": 0,
    "train.sparse_experts_background": "", "train.sparse_experts_select": "step", "train.sparse_experts_target": "",
    "train.lora_rank": 0, "train.lora_alpha": 16.0,
    "train.lora_targets": ["wq", "wk", "wv", "wo", "fc_in", "fc_out"],
}


def config_hash(cfg: Config) -> str:
    """sha256 (16 hex digits) of the config minus :data:`RESUME_SAFE_KEYS`; a resume
    whose hash differs from the checkpoint's would mix incompatible runs."""
    return hashlib.sha256(json.dumps(_hashed_keys(to_dict(cfg)), sort_keys=True).encode()).hexdigest()[:16]


def _hashed_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a config as nested dicts) without the :data:`RESUME_SAFE_KEYS`."""
    data = copy.deepcopy(data)
    for key in (*RESUME_SAFE_KEYS, *HASHED_UNLESS_DEFAULT):
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        if key in HASHED_UNLESS_DEFAULT and node.get(leaf, HASHED_UNLESS_DEFAULT[key]) != HASHED_UNLESS_DEFAULT[key]:
            continue
        node.pop(leaf, None)
    return data


def hashed_differences(saved: Config, cfg: Config) -> list[str]:
    """The keys outside :data:`RESUME_SAFE_KEYS` where two configs differ, as
    ``"section.key: saved -> now"`` (why a resume with ``cfg`` is refused)."""
    before, now = _flat(_hashed_keys(to_dict(saved))), _flat(_hashed_keys(to_dict(cfg)))
    return [f"{key}: {before[key]!r} -> {now[key]!r}" for key in sorted(before) if before[key] != now[key]]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def dump_toml(cfg: Config) -> str:
    """Serialise to TOML (the resolved config written into the run folder)."""
    lines: list[str] = []

    def emit(section: str, data: dict[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
        if scalars:
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in data.items():
            if isinstance(v, dict):
                emit(f"{section}.{k}", v)

    for name, section in to_dict(cfg).items():
        emit(name, section)
    return "\n".join(lines)
