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

Keys may be written dotted (``model.d_model = 96``, TOML nests them) or quoted
(``"model.d_model" = 96``); both mean the config key ``model.d_model``. A method is a
label, not a kind: the kind is whatever ``model.ffn`` the overrides give (ablations use
labels such as ``bn`` / ``no-bn`` for two PEER variants). Merge order per run:
config defaults < base file < [overrides] < method overrides < size < the keys the
sweep sets itself (``run.dir``, ``run.name``, ``train.max_steps``, and
``train.warmup_steps`` when ``warmup_fraction`` is given), which the spec may not set.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from peer_dist.errors import ConfigError

# Keys the sweep derives for every run; a spec setting them would be silently ignored.
SWEEP_OWNED_KEYS = ("run.dir", "run.name", "train.max_steps")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # becomes part of a run folder name
_SWEEP_KEYS = ("base", "budgets", "min_steps", "warmup_fraction", "description")
_METHOD_KEYS = ("overrides", "sizes")


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
    _no_unknown(raw, ("sweep", "overrides", "methods"), where, "top level")
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
    )
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
        methods.append(MethodSpec(name, overrides, _sizes(table.get("sizes"), label)))
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
    owned = SWEEP_OWNED_KEYS + (("train.warmup_steps",) if spec.warmup_fraction is not None else ())
    tables = [("[overrides]", spec.overrides)]
    for method in spec.methods:
        tables.append((f"methods.{method.name}.overrides", method.overrides))
        tables += [(f"methods.{method.name} size {s.name!r}", s.overrides) for s in method.sizes]
    for label, table in tables:
        for key in owned:
            if key in table:
                why = ("set from sweep.warmup_fraction" if key == "train.warmup_steps"
                       else "set by the sweep for every run (steps come from the FLOP budget)")
                raise ConfigError(f"{where}: {label} sets {key}, which is {why}; remove it")
