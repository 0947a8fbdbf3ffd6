"""`peer-dist bench ckpt`: what interval checkpoints cost a training run, synchronous vs asynchronous.

Two runs of the same training job in fresh processes: interval checkpoints written
synchronously, and with ``train.async_save``. Each run logs every step, so a step's
time is measured inside the run that saves (``train/tokens_per_s`` of a one-step
interval). Per mode:

* blocked per save: the trainer's ``ckpt/blocking_s`` (the whole write when synchronous;
  gathering and copying the state when asynchronous), median over the interval saves;
* step time: median, and the 10th..90th percentile spread, of the steps that hold no
  save (a save runs after its step's log line, so the next step's interval holds it);
* cost per interval: blocked per save / (interval x median step time), the share of an
  interval's training time the loop stood still. It is a ratio of two positive times
  measured in the same process, so never negative. The slowdown of the steps an
  asynchronous write overlaps (the write competes for the cores) shows in the
  ``after-save step`` column: the median time of the first step after each save,
  minus its blocked time.

Comparing the wall time of separate runs (with and without saves) was dropped: on a
shared CPU their noise exceeds the cost and gave negative "overheads". The model
defaults to a PEER LM whose checkpoint is ~1.6 GB (512^2 experts, d = 256), so the write
is not lost in the noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from peer_dist.bench import require_prepared_data
from peer_dist.data import Manifest
from peer_dist.errors import ConfigError

MODEL = ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.d_ff=1024",
         "model.peer.num_experts=262144", "model.peer.heads=8", "model.peer.topk=16", "model.peer.d_key=128"]
MODES = (("sync", ["train.async_save=false"]), ("async", ["train.async_save=true"]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/stdlib-byte", help="a prepared data folder (default data/stdlib-byte)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--interval", type=int, default=5, help="steps between checkpoints (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch size (default 8)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for both runs")


def run(args: argparse.Namespace) -> int:
    require_prepared_data(args.data)
    if args.interval < 2:
        raise ConfigError(f"--interval {args.interval}: must be at least 2 (a step time needs a step without a save)")
    if args.steps < 2 * args.interval:
        raise ConfigError(f"--steps {args.steps} must allow at least two interval checkpoints (--interval "
                          f"{args.interval})")
    results: dict[str, Any] = {"config": {"steps": args.steps, "interval": args.interval, "batch": args.batch,
                                          "model": MODEL + list(args.overrides)}, "modes": {}}
    tokens_per_step = args.batch * Manifest.load(args.data).seq_len  # one process
    with tempfile.TemporaryDirectory(prefix="peer-dist-bench-ckpt-") as tmp:
        for mode, extra in MODES:
            rows = _one_run(args, Path(tmp), mode, extra)
            results["modes"][mode] = summarize(rows, args.steps, args.interval, tokens_per_step,
                                               checkpoint_mb(Path(tmp) / mode))
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _one_run(args: argparse.Namespace, tmp: Path, mode: str, extra: list[str]) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "peer_dist.cli", "train", *MODEL, f"data.path={args.data}", f"run.dir={tmp}",
           f"run.name={mode}", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}",
           "train.eval_interval=0", "train.eval_batches=1", "train.progress=false", "train.log_interval=1",
           f"train.ckpt_interval={args.interval}", "train.ckpt_keep=1", *extra, *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"bench run {mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (tmp / mode / "metrics.jsonl").read_text().splitlines()]


def checkpoint_mb(run_dir: Path) -> float:
    """Megabytes of the run's checkpoints folder."""
    return sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file()) / 2**20


def summarize(rows: list[dict[str, Any]], steps: int, interval: int, tokens_per_step: int,
              checkpoint_mb: float) -> dict[str, Any]:
    """Blocked time per save against the step time of the same run (module doc).

    ``rows``: metrics.jsonl of a run logged every step. Step 1 (warm-up: first calls,
    allocations) and every step whose interval holds a save (the step after it) are
    left out of the step time.
    """
    blocked = {r["step"]: r["ckpt/blocking_s"] for r in rows if "ckpt/blocking_s" in r and r["step"] < steps}
    # A one-step interval: train/tokens_per_s = tokens_per_step / that step's seconds.
    step_s = {r["step"]: tokens_per_step / r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r}
    clean = sorted(t for s, t in step_s.items() if s > 1 and s - 1 not in blocked)
    after = [step_s[s + 1] - b for s, b in blocked.items() if s + 1 in step_s]
    if not blocked or not clean:
        raise RuntimeError(f"the run logged {len(blocked)} interval saves and {len(clean)} steps without one; "
                           "raise --steps")
    median_step = statistics.median(clean)
    median_blocked = statistics.median(blocked.values())
    return {"interval_saves": len(blocked), "blocking_s": [blocked[s] for s in sorted(blocked)],
            "blocking_s_median": median_blocked, "step_s_median": median_step,
            "step_s_p10": _quantile(clean, 0.1), "step_s_p90": _quantile(clean, 0.9), "clean_steps": len(clean),
            "after_save_step_s_median": statistics.median(after) if after else None,
            "cost_per_interval": median_blocked / (interval * median_step), "checkpoint_mb": checkpoint_mb}


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of an ascending list (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def format_report(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = [f"checkpoint cost: {c['steps']} steps logged one by one, a checkpoint every {c['interval']} (+ the final "
             f"one), micro-batch {c['batch']}; step times from the same run, saves left out",
             f"{'mode':<6} {'saves':>5} {'blocked s/save':>15} {'step s (p10..p90)':>24} {'cost/interval':>14} "
             f"{'after-save step':>16} {'ckpt MB':>8}"]
    for mode, r in results["modes"].items():
        spread = f"{r['step_s_median']:.3f} ({r['step_s_p10']:.3f}..{r['step_s_p90']:.3f})"
        after = "-" if r["after_save_step_s_median"] is None else f"{r['after_save_step_s_median']:.3f}"
        lines.append(f"{mode:<6} {r['interval_saves']:>5} {r['blocking_s_median']:>15.3f} {spread:>24} "
                     f"{100 * r['cost_per_interval']:>13.1f}% {after:>16} {r['checkpoint_mb']:>8.0f}")
    return "\n".join(lines)
