"""`peer-dist bench model`: whole language models of a sweep spec trained side by side, time per counted FLOP.

Each method's model at one size of the spec (default: dense and PEER at d64 of
configs/sweeps/tiny.toml) trains ``--steps`` steps through the real trainer (one
process, DeepSpeed engine, data loader) in a fresh subprocess; methods alternate
over ``--repeats`` rounds so that drift on a shared machine hits all of them. The
trainer logs ``train/model_flops_per_s`` per log interval (the training FLOPs of
peer_dist.model.flops per token x tokens/s); the first interval of every run is
warm-up and dropped, the rest pooled, and the median reported. The ratio that
matters: a method's time per counted FLOP over dense's (dense FLOP/s over the
method's FLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from peer_dist.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `peer-dist bench model`."""
    parser.add_argument("--spec", default="configs/sweeps/tiny.toml", help="sweep spec naming methods and sizes")
    parser.add_argument("--size", default="d64", help="size name of the spec (default d64)")
    parser.add_argument("--methods", default="dense,peer", help="comma-separated methods of the spec; the first "
                        "is the reference of the ratios (default dense,peer)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--log-interval", type=int, default=10, help="steps per measured interval (default 10)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the methods (default 2)")
    parser.add_argument("--data", default=None, help="prepared data folder (default: the spec's data.path)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per training run")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results dict here")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run, e.g. train.zero_stage=1")


def run(args: argparse.Namespace) -> int:
    methods = _check_args(args)
    configs = {m: _run_overrides(args, m) for m in methods}
    flops_per_s: dict[str, list[float]] = {m: [] for m in methods}
    tokens_per_s: dict[str, list[float]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for method in methods:
                rows = _train(configs[method], Path(tmp), f"{method}-{rep}", args.timeout)
                flops_per_s[method] += [r["train/model_flops_per_s"] for r in rows]
                tokens_per_s[method] += [r["train/tokens_per_s"] for r in rows]
    results = _summarise(methods, flops_per_s, tokens_per_s, args)
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _check_args(args: argparse.Namespace) -> list[str]:
    from peer_dist.sweep.spec import load_spec

    for flag, value in (("--steps", args.steps), ("--log-interval", args.log_interval), ("--repeats", args.repeats)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.steps < 2 * args.log_interval:
        raise ConfigError(f"--steps {args.steps} must be at least 2 x --log-interval {args.log_interval}: the first "
                          "interval is warm-up and is not measured")
    spec = load_spec(args.spec)
    methods = [m for m in args.methods.split(",") if m]
    known = [m.name for m in spec.methods]
    for name in methods:
        if name not in known:
            raise ConfigError(f"--methods: {name!r} is not a method of {args.spec}; allowed: {', '.join(known)}")
        sizes = [s.name for s in spec.method(name).sizes]
        if args.size not in sizes:
            raise ConfigError(f"--size {args.size!r} is not a size of method {name} in {args.spec}; "
                              f"allowed: {', '.join(sizes)}")
    if not methods:
        raise ConfigError("--methods needs at least one method")
    return methods


def _run_overrides(args: argparse.Namespace, method: str) -> tuple[str | None, list[str]]:
    """(base config file, overrides) of ``method`` at ``args.size``, as the sweep would train it."""
    from peer_dist.sweep.plan import render_value
    from peer_dist.sweep.spec import load_spec

    spec = load_spec(args.spec)
    m = spec.method(method)
    size = next(s for s in m.sizes if s.name == args.size)
    merged = {**spec.overrides, **m.overrides, **size.overrides}
    overrides = [f"{k}={render_value(v)}" for k, v in merged.items()]
    overrides += [f"train.max_steps={args.steps}", f"train.log_interval={args.log_interval}",
                  "train.warmup_steps=1", "train.eval_interval=0", "train.eval_batches=1", "train.ckpt_interval=0",
                  "train.progress=false", "run.tensorboard=false"]
    if args.data:
        overrides.append(f"data.path={args.data}")
    return (str(spec.base) if spec.base else None), overrides + list(args.overrides)


def _train(config: tuple[str | None, list[str]], run_dir: Path, name: str, timeout: float) -> list[dict[str, Any]]:
    """One training run in a fresh process; its measured intervals (the first, warm-up, dropped)."""
    base, overrides = config
    cmd = [sys.executable, "-m", "peer_dist.cli", "train", *(["--config", base] if base else []), *overrides,
           f"run.dir={run_dir}", f"run.name={name}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench model: training run {name} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/model_flops_per_s" in r][1:]


def _summarise(methods: list[str], flops_per_s: dict[str, list[float]], tokens_per_s: dict[str, list[float]],
               args: argparse.Namespace) -> dict[str, Any]:
    reference = methods[0]
    out: dict[str, Any] = {"spec": args.spec, "size": args.size, "steps": args.steps, "repeats": args.repeats,
                           "reference": reference, "methods": {}}
    ref_flops = statistics.median(flops_per_s[reference])
    for m in methods:
        median = statistics.median(flops_per_s[m])
        out["methods"][m] = {"model_flops_per_s": median, "tokens_per_s": statistics.median(tokens_per_s[m]),
                             "intervals": len(flops_per_s[m]), "samples": flops_per_s[m],
                             "time_per_flop_over_reference": ref_flops / median}
    return out


def format_report(results: dict[str, Any]) -> str:
    ref = results["reference"]
    lines = [f"whole model, {results['spec']} size {results['size']}: {results['steps']} steps x "
             f"{results['repeats']} rounds per method, one process, first log interval dropped",
             f"{'method':<8} {'tokens/s':>10} {'GFLOP/s':>9} {'time/FLOP vs ' + ref:>18} {'intervals':>9}"]
    for m, row in results["methods"].items():
        lines.append(f"{m:<8} {row['tokens_per_s']:>10.0f} {row['model_flops_per_s'] / 1e9:>9.2f} "
                     f"{row['time_per_flop_over_reference']:>17.2f}x {row['intervals']:>9d}")
    return "\n".join(lines)
