"""`peer-dist bench ckpt`: what interval checkpoints cost a training run, synchronous vs asynchronous.

Three runs of the same training job, one after the other in fresh processes: no interval
checkpoint, interval checkpoints written synchronously, and with ``train.async_save``.
Reported per mode: the time the training loop stood still per interval save (the trainer's
``ckpt/blocking_s``: the whole write for a synchronous save; gathering and copying the state
for an asynchronous one) as a median, and the run's wall time next to the run without
interval saves. The model defaults to a PEER LM whose checkpoint is ~1.6 GB (512^2 experts,
d = 256), so the write is not lost in the noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peer_dist.bench import require_prepared_data
from peer_dist.errors import ConfigError

MODEL = ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.d_ff=1024",
         "model.peer.num_experts=262144", "model.peer.heads=8", "model.peer.topk=16", "model.peer.d_key=128"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/stdlib-byte", help="a prepared data folder (default data/stdlib-byte)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--interval", type=int, default=5, help="steps between checkpoints (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch size (default 8)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for all three runs")


def run(args: argparse.Namespace) -> int:
    require_prepared_data(args.data)
    if args.steps < 2 * args.interval:
        raise ConfigError(f"--steps {args.steps} must allow at least two interval checkpoints (--interval "
                          f"{args.interval})")
    results: dict[str, Any] = {"config": {"steps": args.steps, "interval": args.interval, "batch": args.batch,
                                          "model": MODEL + list(args.overrides)}, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="peer-dist-bench-ckpt-") as tmp:
        for mode, extra in (("none", ["train.ckpt_interval=0"]),
                            ("sync", [f"train.ckpt_interval={args.interval}", "train.async_save=false"]),
                            ("async", [f"train.ckpt_interval={args.interval}", "train.async_save=true"])):
            results["modes"][mode] = _one_run(args, Path(tmp), mode, extra)
    base = results["modes"]["none"]["wall_s"]
    for row in results["modes"].values():
        row["overhead"] = row["wall_s"] / base - 1
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _one_run(args: argparse.Namespace, tmp: Path, mode: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "peer_dist.cli", "train", *MODEL, f"data.path={args.data}", f"run.dir={tmp}",
           f"run.name={mode}", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}",
           "train.eval_interval=0", "train.eval_batches=1", "train.progress=false",
           f"train.log_interval={args.interval}", "train.ckpt_keep=1", *extra, *args.overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"bench run {mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (tmp / mode / "metrics.jsonl").read_text().splitlines()]
    blocking = [r["ckpt/blocking_s"] for r in rows if "ckpt/blocking_s" in r and r["step"] < args.steps]
    size = sum(p.stat().st_size for p in (tmp / mode / "checkpoints").rglob("*") if p.is_file())
    return {"wall_s": wall, "interval_saves": len(blocking),
            "blocking_s_median": statistics.median(blocking) if blocking else 0.0, "checkpoint_mb": size / 2**20}


def format_report(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = [f"checkpoint cost: {c['steps']} steps, a checkpoint every {c['interval']} (+ the final one), "
             f"micro-batch {c['batch']}",
             f"{'mode':<6} {'wall s':>8} {'overhead':>9} {'saves':>6} {'blocked s/save':>15} {'ckpt MB':>8}"]
    for mode, r in results["modes"].items():
        lines.append(f"{mode:<6} {r['wall_s']:>8.1f} {100 * r['overhead']:>8.1f}% {r['interval_saves']:>6} "
                     f"{r['blocking_s_median']:>15.2f} {r['checkpoint_mb']:>8.0f}")
    return "\n".join(lines)
