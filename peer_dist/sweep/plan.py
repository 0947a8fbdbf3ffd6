"""Planning an isoFLOP sweep: every (budget, method, size) becomes one training run.

Steps per run (the paper's isoFLOP protocol: every configuration trains on the same
training compute)::

    flops_per_token = model_flops_per_token(cfg.model, vocab, seq_len)   # training = fwd + bwd
    tokens_per_step = global_batch * seq_len                              # seq_len: the data manifest
    global_batch    = micro_batch_size * grad_accum * (nproc / parallel.tp)
    steps           = floor(budget / (flops_per_token * tokens_per_step))

(peer_dist/model/flops.py documents what ``model_flops_per_token`` counts.) Validation
FLOPs are not part of the budget, as in the paper. A configuration whose budget buys
fewer than ``sweep.min_steps`` steps is refused: its result would say nothing.

With ``sweep.seeds`` every point is one run per seed (``<name>-s<seed>``). With a
[tune] table, :func:`plan_tuning` gives the grid runs (``tune-b<budget>-<method>-<size>-
lr<lr>[-t<scale>][-s<seed>]``, evaluated on the data's tuning split) and the main runs
take each method's chosen settings (``choices``); a method whose tuning has not
finished has its main runs planned with ``waiting = True`` (steps do not depend on the
learning rate, so the plan still shows them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from peer_dist.config import Config, config_hash, load_config, validate
from peer_dist.errors import ConfigError, UserError
from peer_dist.parallel.layout import ParallelLayout
from peer_dist.sweep.spec import (TABLE_FFNS, TUNED_KEYS, MethodSpec, SizeSpec, SweepSpec, budget_label,
                                  flops_text)

LAUNCHERS = ("none", "torchrun")


@dataclass(frozen=True)
class Launch:
    """How each run is started: one plain process, or ``torchrun --standalone`` with nproc processes."""

    launcher: str = "none"
    nproc: int = 1

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher {self.launcher!r}: allowed are {', '.join(LAUNCHERS)}")
        if self.nproc < 1:
            raise ConfigError(f"--nproc {self.nproc}: must be >= 1")
        if self.launcher == "none" and self.nproc != 1:
            raise ConfigError(f"--nproc {self.nproc} needs --launcher torchrun (--launcher none runs one process)")


@dataclass
class PlannedRun:
    """One point of the sweep, with everything the tables report before it trains."""

    budget: float
    method: str
    size: str
    cfg: Config  # resolved: run.dir, run.name, train.max_steps (and warmup) set
    ffn: str
    vocab_size: int
    seq_len: int
    global_batch: int
    flops_per_token: float  # training FLOPs per token
    params_total: int
    params_active: int
    steps: int
    data_fingerprint: str  # of the data manifest the run trains on (its checkpoints record it)
    seed: int = 0  # train.seed
    stage: str = "main"  # "main": reported on the validation split; "tune": a grid run, on the tuning split
    settings: dict[str, float] = field(default_factory=dict)  # the tuned keys this run sets (train.lr, ...)
    waiting: bool = False  # a main run whose method's tuning has not finished: not started yet

    @property
    def name(self) -> str:
        return self.cfg.run.name

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        """Training FLOPs actually spent: at most the budget (steps are floored)."""
        return self.steps * self.flops_per_token * self.tokens_per_step

    @property
    def config_hash(self) -> str:
        return config_hash(self.cfg)

    @property
    def num_experts(self) -> int | None:
        """N of a PEER layer / value slots of a PKM layer / E of an MoE layer; None for dense."""
        model = self.cfg.model
        return {"peer": model.peer.num_experts, "pkm": model.pkm.num_values, "moe": model.moe.num_experts}.get(self.ffn)

    @property
    def slots_per_token(self) -> int | None:
        """h * k for PEER/PKM (experts or slots a token retrieves), k for MoE."""
        model = self.cfg.model
        return {"peer": model.peer.heads * model.peer.topk, "pkm": model.pkm.heads * model.pkm.topk,
                "moe": model.moe.topk}.get(self.ffn)


def steps_for_budget(budget: float, flops_per_token: float, tokens_per_step: int) -> int:
    """floor(budget / (flops_per_token * tokens_per_step)) in exact arithmetic (no rounding at integer ratios)."""
    if flops_per_token <= 0 or tokens_per_step <= 0:
        raise ValueError("flops_per_token and tokens_per_step must be positive")
    # Each float as the decimal it prints as (what the spec says): 0.3 / 0.1 is 3 steps, not 2.
    exact = lambda value: Fraction(repr(float(value)))  # noqa: E731
    return math.floor(exact(budget) / (exact(flops_per_token) * tokens_per_step))


def plan_sweep(spec: SweepSpec, output: str | Path, launch: Launch, only: list[str] | None = None,
               choices: dict[str, dict[str, float]] | None = None) -> list[PlannedRun]:
    """Every (budget, method, size, seed) of the spec, in spec order.

    ``only`` keeps some of them: each entry a method ("peer") or one size of it ("peer/d96").
    ``choices``: per method, the tuned keys chosen by its grid ({"train.lr": 2e-3, ...});
    with a [tune] table, a method without one gets ``waiting`` runs.

    Raises ConfigError naming the point for a config that does not validate, and one
    ConfigError listing every point whose budget buys fewer than ``spec.min_steps`` steps.
    """
    wanted = _selection(spec, only)
    methods = [m for m in spec.methods if m.name in wanted]
    run_root = Path(output) / "runs"
    data = _DataInfo()
    runs = []
    seeds = spec.seeds or (None,)
    for budget in spec.budgets:
        for method in methods:
            chosen = (choices or {}).get(method.name)
            waiting = spec.tune is not None and chosen is None
            for size in method.sizes:
                if wanted[method.name] and size.name not in wanted[method.name]:
                    continue
                for seed in seeds:
                    name = f"b{budget_label(budget)}-{method.name}-{size.name}" + ("" if seed is None else f"-s{seed}")
                    extra = {"data.eval_split": "val", **(chosen or {})}
                    if seed is not None:
                        extra["train.seed"] = seed
                    run = _plan_point(spec, budget, method, size, run_root, launch, data, name, extra)
                    run.settings, run.waiting = dict(chosen or {}), waiting
                    runs.append(run)
    _check_steps(spec, runs)
    return runs


def plan_tuning(spec: SweepSpec, output: str | Path, launch: Launch,
                only: list[str] | None = None) -> list[PlannedRun]:
    """The [tune] grid runs of the (selected) methods: spec.tune.size at spec.tune.budget, per grid point and seed.

    Every run evaluates on the tuning split (data.eval_split = "tune"). train.table_lr_scale
    is searched only for methods whose model.ffn is pkm or peer (the others have no tables).
    """
    tune = spec.tune
    if tune is None:
        return []
    wanted = _selection(spec, only)
    run_root = Path(output) / "runs"
    data = _DataInfo()
    runs = []
    seeds = tune.seeds or (spec.seeds[:1] if spec.seeds else (None,))
    for method in (m for m in spec.methods if m.name in wanted):
        size = next(s for s in method.sizes if s.name == tune.size)
        for point in _grid_points(spec, method, size, run_root, launch, data):
            for seed in seeds:
                label = "-".join(f"{_GRID_LABEL[k]}{_short(v)}" for k, v in point.items())
                name = f"tune-b{budget_label(tune.budget)}-{method.name}-{size.name}-{label}" + \
                    ("" if seed is None else f"-s{seed}")
                extra: dict[str, Any] = {"data.eval_split": "tune", **point}
                if seed is not None:
                    extra["train.seed"] = seed
                run = _plan_point(spec, tune.budget, method, size, run_root, launch, data, name, extra)
                run.stage, run.settings = "tune", dict(point)
                runs.append(run)
    _check_steps(spec, runs)
    return runs


_GRID_LABEL = {"train.lr": "lr", "train.table_lr_scale": "t"}


def _short(value: float) -> str:
    """A grid value for a folder name: 0.002 -> "0.002", 3.0 -> "3", 1e-05 -> "1e-05"."""
    return format(value, "g")


def _grid_points(spec: SweepSpec, method: MethodSpec, size: SizeSpec, run_root: Path, launch: Launch,
                 data: _DataInfo) -> list[dict[str, float]]:
    """The method's grid as {config key: value} points, lr outermost; table scales only for pkm/peer."""
    assert spec.tune is not None
    grid = spec.tune.grid_for(method)
    probe = _plan_point(spec, spec.tune.budget, method, size, run_root, launch, data, "probe", {})
    lists = {TUNED_KEYS[k]: v for k, v in grid.items() if k != "table_lr_scale" or probe.ffn in TABLE_FFNS}
    if "table_lr_scale" in method.tune and probe.ffn not in TABLE_FFNS:
        raise ConfigError(f"sweep spec {spec.path}: methods.{method.name}.tune gives table_lr_scale, but the "
                          f"method's model.ffn is {probe.ffn!r}: it has no expert tables (pkm, peer have)")
    points: list[dict[str, float]] = [{}]
    for key, values in lists.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def _check_steps(spec: SweepSpec, runs: list[PlannedRun]) -> None:
    short = [r for r in runs if r.steps < spec.min_steps]
    if short:
        raise ConfigError(_too_few_steps_message(spec, short))


def _selection(spec: SweepSpec, only: list[str] | None) -> dict[str, set[str]]:
    """{method: sizes wanted (empty set: all)} from ``--only`` entries METHOD or METHOD/SIZE."""
    if not only:
        return {m.name: set() for m in spec.methods}
    whole: set[str] = set()
    sizes: dict[str, set[str]] = {}
    for entry in only:
        name, _, size = entry.partition("/")
        method = spec.method(name)  # ConfigError naming the spec's methods
        if not size:
            whole.add(name)
        elif size in {s.name for s in method.sizes}:
            sizes.setdefault(name, set()).add(size)
        else:
            raise ConfigError(f"--only {entry}: method {name} has no size {size!r}; it has: "
                              f"{', '.join(s.name for s in method.sizes)}")
    return {name: set() if name in whole else sizes[name] for name in whole | sizes.keys()}


def _plan_point(spec: SweepSpec, budget: float, method: MethodSpec, size: SizeSpec, run_root: Path, launch: Launch,
                data: _DataInfo, name: str, extra: dict[str, Any]) -> PlannedRun:
    """One run: the spec's merge (module doc of spec.py), then ``extra`` (keys the sweep sets), then steps."""
    from peer_dist.model.flops import active_params, model_flops_per_token, total_params

    where = f"sweep point {method.name}/{size.name}"
    overrides = {**spec.overrides, **method.overrides, **size.overrides, **extra}
    try:
        cfg = load_config(spec.base, [f"{key}={render_value(value)}" for key, value in overrides.items()])
        layout = ParallelLayout(launch.nproc, tp=cfg.parallel.tp, ep=cfg.parallel.ep)
        seq_len, data_vocab, fingerprint = data.get(cfg.data.path, cfg)
        vocab = cfg.model.vocab_size or data_vocab
        fpt = model_flops_per_token(cfg.model, vocab, seq_len)
        params = total_params(cfg.model, vocab), active_params(cfg.model, vocab)
    except UserError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * layout.dp
    steps = steps_for_budget(budget, fpt, global_batch * seq_len)
    cfg.run.dir = str(run_root)
    cfg.run.name = name
    cfg.train.max_steps = max(steps, 1)  # below min_steps the whole plan is refused after planning
    if spec.warmup_fraction is not None:
        cfg.train.warmup_steps = round(spec.warmup_fraction * steps)
    elif steps >= spec.min_steps and cfg.train.warmup_steps >= steps:
        raise ConfigError(f"{where}: train.warmup_steps = {cfg.train.warmup_steps} is not below its {steps} steps "
                          f"(budget {flops_text(budget)}); set sweep.warmup_fraction or a smaller train.warmup_steps")
    try:
        validate(cfg)
    except UserError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if cfg.data.eval_split == "tune":  # a tuning run would train in full, then fail at its validation
        try:
            data.manifest(cfg.data.path, cfg).num_samples("tune")
        except UserError as exc:
            raise type(exc)(f"{where}: the [tune] grid evaluates on the tuning split: {exc}") from None
    return PlannedRun(budget, method.name, size.name, cfg, cfg.model.ffn, vocab, seq_len, global_batch, fpt,
                      params[0], params[1], steps, fingerprint, seed=cfg.train.seed)


class _DataInfo:
    """(seq_len, vocab, fingerprint) of each data path, read once from its manifest."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def manifest(self, path: str, cfg: Config) -> Any:
        if path not in self._cache:
            from peer_dist.data import Manifest

            self._cache[path] = Manifest.load(path, read_retries=cfg.data.read_retries,
                                              retry_wait_s=cfg.data.retry_wait_s)
        return self._cache[path]

    def get(self, path: str, cfg: Config) -> tuple[int, int, str]:
        manifest = self.manifest(path, cfg)
        return manifest.seq_len, manifest.vocab_size, manifest.fingerprint


def render_value(value: Any) -> str:
    """A TOML value as a dotted-override text that load_config parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _too_few_steps_message(spec: SweepSpec, short: list[PlannedRun]) -> str:
    lines = [f"sweep spec {spec.path}: {len(short)} configuration(s) get fewer than sweep.min_steps = "
             f"{spec.min_steps} training steps from their budget:"]
    for r in short:
        step_flops = r.flops_per_token * r.tokens_per_step
        lines.append(f"  budget {flops_text(r.budget)}, {r.method}/{r.size}: {r.steps} steps "
                     f"({flops_text(r.flops_per_token)} FLOPs/token x {r.tokens_per_step} tokens/step = {flops_text(step_flops)} "
                     f"FLOPs/step; needs a budget >= {flops_text(spec.min_steps * step_flops)})")
    lines.append("raise the budget, drop or shrink these sizes, use a smaller batch, or lower sweep.min_steps")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- printing


def human(n: float) -> str:
    """1234567 -> "1.23M"; for parameter and token counts."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def format_plan(runs: list[PlannedRun], statuses: dict[str, str] | None = None) -> str:
    """The plan table that --dry-run prints (and the sweep prints before it starts)."""
    header = ["budget", "method", "size", "ffn", "params total", "params active", "FLOPs/token", "steps", "tokens",
              "FLOPs used", "run"]
    if statuses is not None:
        header.append("status")
    rows = []
    for r in runs:
        row = [flops_text(r.budget), r.method, r.size, r.ffn, human(r.params_total), human(r.params_active),
               flops_text(r.flops_per_token), str(r.steps), human(r.tokens), f"{r.flops / r.budget:.1%}", r.name]
        if statuses is not None:
            row.append(statuses.get(r.name, "-"))
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
