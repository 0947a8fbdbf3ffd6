"""The sweep spec: a TOML file naming a base config, FLOP budgets and, per method, a family of sizes.

Format (see configs/sweeps/tiny.toml for a complete one)::

    [sweep]
    base = "../tiny.toml"        # config file every run starts from; relative to this spec file
    budgets = [1.5e13, 3e13]     # training FLOPs per run (model_flops_per_token x tokens)
    min_steps = 10               # a (budget, method, size) with fewer steps is refused [10]
    warmup_fraction = 0.05       # optional: train.warmup_steps = round(fraction x steps) per run

    [overrides]                  # dotted config keys shared by every run
    data.path = "data/stdlib-byte"
    train.eval_interval = 0

    [methods.peer]               # a method: a label (a line in the plot), its overrides, its sizes
    overrides = { model.ffn = "peer", model.peer.heads = 8 }
    sizes = [
      { name = "n128", model.peer.num_experts = 16384 },
      { name = "n256", model.peer.num_experts = 65536 },
    ]
    tune = { lr = [1e-3, 3e-3] } # optional: this method's own grid (replaces [tune]'s lists given here)

Optional, for a fair comparison (see docs/sweeps.md)::

    [sweep]
    seeds = [0, 1]               # train.seed of each reported point's runs (mean +- spread over them)
    close_seeds = [2]            # more seeds where a difference is within noise (below)

    [tune]                       # a learning-rate grid per method, chosen on the data's tuning split
    budget = 1e12                # training FLOPs of every tuning run, the same for every method
    size = "d64"                 # the size of each method the grid trains
    lr = [1e-3, 2e-3, 4e-3]      # train.lr values, every method
    table_lr_scale = [1, 3, 10]  # train.table_lr_scale values, methods whose model.ffn is pkm or peer
    seeds = [0]                  # train.seed of the tuning runs [the first of sweep.seeds, or the config's]

``close_seeds``: once every point of a budget has finished its ``seeds``, the best point of
each method whose mean perplexity is within 2 standard errors of the budget's best method
(and that best method's point) also trains these seeds. The decision uses the ``seeds``
runs only, so a rerun plans the same extra runs.

Keys may be written dotted (``model.d_model = 96``, TOML nests them) or quoted
(``"model.d_model" = 96``); both mean the config key ``model.d_model``. A method is a
label, not a kind: the kind is whatever ``model.ffn`` the overrides give (ablations use
labels such as ``bn`` / ``no-bn`` for two PEER variants). Merge order per run:
config defaults < base file < [overrides] < method overrides < size < the keys the
sweep sets itself (``run.dir``, ``run.name``, ``train.max_steps``, ``data.eval_split``,
``train.warmup_steps`` when ``warmup_fraction`` is given, ``train.seed`` with
``sweep.seeds``, and the keys a [tune] grid sets), which the spec may not set.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from peer_dist.errors import ConfigError

# Keys the sweep derives for every run; a spec setting them would be silently ignored.
SWEEP_OWNED_KEYS = ("run.dir", "run.name", "train.max_steps", "data.eval_split")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # becomes part of a run folder name
_SWEEP_KEYS = ("base", "budgets", "min_steps", "warmup_fraction", "description", "seeds", "close_seeds")
_METHOD_KEYS = ("overrides", "sizes", "tune")
_TUNE_KEYS = ("budget", "size", "lr", "table_lr_scale", "seeds")
# [tune] list -> the config key each value sets; table_lr_scale only for these model.ffn kinds
TUNED_KEYS = {"lr": "train.lr", "table_lr_scale": "train.table_lr_scale"}
TABLE_FFNS = ("pkm", "peer")


@dataclass(frozen=True)
class SizeSpec:
    """One model size of a method: a name (part of the run name) and its dotted overrides."""

    name: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    overrides: dict[str, Any]
    sizes: tuple[SizeSpec, ...]
    tune: dict[str, tuple[float, ...]] = field(default_factory=dict)  # this method's own grid lists


@dataclass(frozen=True)
class TuneSpec:
    """The learning-rate search: every method trains its grid at one size and budget, on the tuning split."""

    budget: float
    size: str
    grid: dict[str, tuple[float, ...]]  # "lr" / "table_lr_scale" -> values
    seeds: tuple[int, ...] | None  # None: the sweep's first seed (or the config's)

    def grid_for(self, method: MethodSpec) -> dict[str, tuple[float, ...]]:
        """The method's grid lists: [tune]'s, with the method's own ``tune`` lists in their place."""
        return {**self.grid, **method.tune}


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    base: Path | None  # resolved against the spec file's folder
    budgets: tuple[float, ...]
    overrides: dict[str, Any]
    methods: tuple[MethodSpec, ...]
    min_steps: int = 10
    warmup_fraction: float | None = None
    description: str = ""
    seeds: tuple[int, ...] | None = None  # None: one run per point with the config's train.seed
    close_seeds: tuple[int, ...] | None = None  # added to points whose difference is within noise
    tune: TuneSpec | None = None

    def method(self, name: str) -> MethodSpec:
        for method in self.methods:
            if method.name == name:
                return method
        raise ConfigError(f"sweep {self.path}: no method {name!r}; the spec has: "
                          f"{', '.join(m.name for m in self.methods)}")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; every problem is a ConfigError naming the spec, key and what is allowed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sweep spec {path} does not parse: {exc}") from None
    return parse_spec(raw, path)


def parse_spec(raw: dict[str, Any], path: Path) -> SweepSpec:
    where = f"sweep spec {path}"
    _no_unknown(raw, ("sweep", "overrides", "methods", "tune"), where, "top level")
    sweep = _table(raw.get("sweep"), f"{where}: [sweep]", required=True)
    _no_unknown(sweep, _SWEEP_KEYS, where, "[sweep]")
    base = sweep.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{where}: sweep.base must be a config file path (a string), got {base!r}")
    overrides = flatten(_table(raw.get("overrides", {}), f"{where}: [overrides]"))
    spec = SweepSpec(
        path=path,
        base=(path.parent / base) if base else None,
        budgets=_budgets(sweep.get("budgets"), where),
        overrides=overrides,
        methods=_methods(raw.get("methods"), where),
        min_steps=_min_steps(sweep.get("min_steps", 10), where),
        warmup_fraction=_warmup_fraction(sweep.get("warmup_fraction"), where),
        description=str(sweep.get("description", "")),
        seeds=_seeds(sweep.get("seeds"), where, "sweep.seeds"),
        close_seeds=_close_seeds(sweep, where),
    )
    if "tune" in raw:
        spec = replace(spec, tune=_tune(_table(raw["tune"], f"{where}: [tune]"), spec, where))
    _check_owned_keys(spec, where)
    return spec


def with_overrides(spec: SweepSpec, pairs: list[str]) -> SweepSpec:
    """The spec with command-line ``key=value`` pairs added to its [overrides] (same merge place)."""
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not key=value (e.g. data.path=data/my-corpus)")
        extra[key.strip()] = value  # a string: load_config parses it like a `train` override
    description = spec.description
    if "data.path" in extra and str(extra["data.path"]) != str(spec.overrides.get("data.path")):
        # The description may name the spec's own data; the results name the data used (its manifest).
        description = ""
    spec = replace(spec, overrides={**spec.overrides, **extra}, description=description)
    _check_owned_keys(spec, f"sweep spec {spec.path} with the command-line overrides")
    return spec


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"peer": {"heads": 8}}, "train.lr": 1e-3} -> {"model.peer.heads": 8, "train.lr": 1e-3}."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def budget_label(budget: float) -> str:
    """A short, folder-safe label: 1.5e13 -> "1.5e13", 2e19 -> "2e19", 3e9 -> "3e9", 1000.0 -> "1000"."""
    return flops_text(budget, "g")


def flops_text(value: float, fmt: str = ".3g") -> str:
    """A FLOP count the way papers write it: 1.5e+13 -> "1.5e13", 3e+09 -> "3e9"."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", format(value, fmt))


# ---------------------------------------------------------------------------- pieces


def _table(value: Any, where: str, required: bool = False) -> dict[str, Any]:
    if value is None and required:
        raise ConfigError(f"{where} is missing (it needs at least sweep.budgets)")
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, got {value!r}")
    return value


def _no_unknown(table: dict[str, Any], allowed: tuple[str, ...], where: str, section: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} in {section} (allowed: {', '.join(allowed)})")


def _budgets(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: sweep.budgets must be a non-empty list of FLOP counts, e.g. [1e13, 3e13]")
    for budget in value:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
                or budget <= 0:
            raise ConfigError(f"{where}: sweep.budgets has {budget!r}; every budget must be a positive number of FLOPs")
    labels = [budget_label(float(b)) for b in value]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: sweep.budgets {value} has duplicates (labels {labels})")
    return tuple(float(b) for b in value)


def _min_steps(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: sweep.min_steps must be an integer >= 1, got {value!r}")
    return value


def _warmup_fraction(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{where}: sweep.warmup_fraction must be a number in [0, 1), got {value!r}")
    return float(value)


def _seeds(value: Any, where: str, key: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                       for s in value):
        raise ConfigError(f"{where}: {key} must be a non-empty list of integers >= 0 (train.seed values), "
                          f"e.g. [0, 1], got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: {key} = {value} has duplicates; each seed once")
    return tuple(value)


def _close_seeds(sweep: dict[str, Any], where: str) -> tuple[int, ...] | None:
    close = _seeds(sweep.get("close_seeds"), where, "sweep.close_seeds")
    if close is None:
        return None
    seeds = _seeds(sweep.get("seeds"), where, "sweep.seeds") or ()
    if len(seeds) < 2:
        raise ConfigError(f"{where}: sweep.close_seeds needs sweep.seeds with at least 2 seeds (a spread to "
                          f"compare differences with), got seeds = {list(seeds)}")
    both = sorted(set(seeds) & set(close))
    if both:
        raise ConfigError(f"{where}: sweep.close_seeds {list(close)} repeats seed(s) {both} of sweep.seeds "
                          f"{list(seeds)}; give new seeds")
    return close


def _grid_list(value: Any, where: str, key: str) -> tuple[float, ...]:
    low = 0.0 if key == "table_lr_scale" else None  # lr > 0; a table scale of 0 freezes the tables (allowed)
    ok = isinstance(value, list) and value and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if low is None
                                                                                            else v >= 0)
        for v in value)
    if not ok:
        allowed = "numbers > 0" if low is None else "numbers >= 0"
        raise ConfigError(f"{where}: tune {key} must be a non-empty list of {allowed}, e.g. "
                          f"{'[1e-3, 2e-3, 4e-3]' if key == 'lr' else '[1, 3, 10]'}, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: tune {key} = {value} has duplicates")
    return tuple(float(v) for v in value)


def _tune(table: dict[str, Any], spec: SweepSpec, where: str) -> TuneSpec:
    _no_unknown(table, _TUNE_KEYS, where, "[tune]")
    budget = table.get("budget")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ConfigError(f"{where}: tune.budget must be a positive number of training FLOPs per tuning run "
                          f"(the same for every method), got {budget!r}")
    size = table.get("size")
    if not isinstance(size, str):
        raise ConfigError(f"{where}: tune.size must name the size of each method the grid trains "
                          f"(e.g. \"{spec.methods[0].sizes[0].name}\"), got {size!r}")
    for method in spec.methods:
        if size not in {s.name for s in method.sizes}:
            raise ConfigError(f"{where}: tune.size = {size!r}, but method {method.name} has no such size; it has: "
                              f"{', '.join(s.name for s in method.sizes)}")
    if "lr" not in table:
        raise ConfigError(f"{where}: [tune] needs lr, the list of train.lr values every method tries")
    grid = {key: _grid_list(table[key], where, key) for key in TUNED_KEYS if key in table}
    seeds = _seeds(table.get("seeds"), where, "tune.seeds")
    return TuneSpec(float(budget), size, grid, seeds)


def _methods(value: Any, where: str) -> tuple[MethodSpec, ...]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: [methods.<name>] tables are missing; add at least one, e.g. [methods.peer]")
    methods = []
    for name, table in value.items():
        label = f"{where}: methods.{name}"
        _check_label(name, f"{where}: method name")
        table = _table(table, label)
        _no_unknown(table, _METHOD_KEYS, where, f"[methods.{name}]")
        overrides = flatten(_table(table.get("overrides", {}), f"{label}.overrides"))
        tune = _table(table.get("tune", {}), f"{label}.tune")
        _no_unknown(tune, tuple(TUNED_KEYS), where, f"methods.{name}.tune")
        grid = {key: _grid_list(values, f"{where}: methods.{name}", key) for key, values in tune.items()}
        methods.append(MethodSpec(name, overrides, _sizes(table.get("sizes"), label), grid))
    return tuple(methods)


def _sizes(value: Any, where: str) -> tuple[SizeSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}.sizes must be a non-empty list of tables of overrides, "
                          "e.g. sizes = [{ name = \"d128\", model.d_model = 128 }]")
    sizes = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}.sizes[{i}] must be a table of overrides, got {item!r}")
        overrides = flatten(item)
        name = overrides.pop("name", None)
        if name is None:
            name = _derived_name(overrides)
        _check_label(name, f"{where}.sizes[{i}].name")
        sizes.append(SizeSpec(str(name), overrides))
    names = [s.name for s in sizes]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{where}.sizes: the name {duplicate!r} is used twice; give each size a distinct `name`")
    return tuple(sizes)


def _derived_name(overrides: dict[str, Any]) -> str:
    """A size without a name is named after its values: {"model.d_model": 96} -> "d_model96"."""
    if not overrides:
        return "base"
    return "-".join(f"{key.rsplit('.', 1)[-1]}{value}" for key, value in overrides.items())


def _check_label(name: Any, where: str) -> None:
    if not isinstance(name, str) or not _LABEL.match(name):
        raise ConfigError(f"{where} = {name!r}: use letters, digits and . _ + - (it becomes part of a run folder name)")


def _check_owned_keys(spec: SweepSpec, where: str) -> None:
    if spec.tune is None and any(m.tune for m in spec.methods):
        name = next(m.name for m in spec.methods if m.tune)
        raise ConfigError(f"{where}: methods.{name}.tune gives a grid but the spec has no [tune] table "
                          "(budget, size, lr); add one")
    owned = SWEEP_OWNED_KEYS + (("train.warmup_steps",) if spec.warmup_fraction is not None else ())
    owned += ("train.seed",) if spec.seeds is not None or (spec.tune and spec.tune.seeds) else ()
    tuned = {TUNED_KEYS[k] for k in spec.tune.grid} | {TUNED_KEYS[k] for m in spec.methods for k in m.tune} \
        if spec.tune else set()
    owned += tuple(sorted(tuned))
    tables = [("[overrides]", spec.overrides)]
    for method in spec.methods:
        tables.append((f"methods.{method.name}.overrides", method.overrides))
        tables += [(f"methods.{method.name} size {s.name!r}", s.overrides) for s in method.sizes]
    for label, table in tables:
        for key in owned:
            if key in table:
                why = {"train.warmup_steps": "set from sweep.warmup_fraction",
                       "train.seed": "set from sweep.seeds / tune.seeds",
                       "data.eval_split": "set by the sweep (tune for tuning runs, val for the others)"}.get(
                    key, "chosen by the [tune] grid" if key in tuned
                    else "set by the sweep for every run (steps come from the FLOP budget)")
                raise ConfigError(f"{where}: {label} sets {key}, which is {why}; remove it")
