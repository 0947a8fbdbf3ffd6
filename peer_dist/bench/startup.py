"""`peer-dist bench startup`: start-up and resume cost per rank as the expert-parallel size grows.

For each EP size E (world = E processes under torchrun, gloo): a fresh run of one step
(set-up: process group, model with this rank's expert shard initialised, DeepSpeed
engine), then the same command again with one more step, which resumes from that
checkpoint. Reported from rank 0's metrics: ``startup/set_up_s`` and
``startup/model_init_s`` (building the model and drawing its initial values) of the
fresh run, ``startup/resume_s`` and ``startup/checkpoint_read_mb`` of the resume, and the
size of this rank's expert shard files. The model init and the bytes read fall about as
1/E (a rank initialises, holds and reads only its own rows); the rest of the set-up
(process group, DeepSpeed) does not. The model defaults to one PEER layer of 512² experts
at d = 256 (about 0.5 GB of tables, 1.6 GB with their Adam moments).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from peer_dist.bench import require_prepared_data
from peer_dist.errors import ConfigError

MODEL = ["model.d_model=256", "model.n_layers=2", "model.n_heads=4", "model.d_ff=1024",
         "model.peer.num_experts=262144", "model.peer.heads=4", "model.peer.topk=8", "model.peer.d_key=64"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/stdlib-byte", help="a prepared data folder (default data/stdlib-byte)")
    parser.add_argument("--ep", default="1,2,4", help="EP sizes = world sizes to compare (default 1,2,4)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")


def run(args: argparse.Namespace) -> int:
    require_prepared_data(args.data)
    try:
        sizes = [int(e) for e in args.ep.split(",")]
    except ValueError:
        raise ConfigError(f"--ep {args.ep!r}: a comma-separated list of EP sizes, e.g. 1,2,4") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--ep {args.ep!r}: every EP size must be >= 1")
    results: dict[str, Any] = {"model": MODEL + list(args.overrides), "ep": {}}
    with tempfile.TemporaryDirectory(prefix="peer-dist-bench-startup-") as tmp:
        for ep in sizes:
            results["ep"][str(ep)] = _measure(args, Path(tmp), ep)
            shutil.rmtree(Path(tmp) / f"ep{ep}", ignore_errors=True)
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _measure(args: argparse.Namespace, tmp: Path, ep: int) -> dict[str, Any]:
    name = f"ep{ep}"
    common = [*MODEL, f"data.path={args.data}", f"run.dir={tmp}", f"run.name={name}", f"parallel.ep={ep}",
              "train.micro_batch_size=2", "train.eval_interval=0", "train.eval_batches=1", "train.progress=false",
              "train.log_interval=1", "train.warmup_steps=0", *args.overrides]
    fresh = _train(args, ep, [*common, "train.max_steps=1"], name)
    shard = sum(p.stat().st_size for p in (tmp / name / "checkpoints").glob("step_000001/state/experts/*.ep000.pt"))
    resumed = _train(args, ep, [*common, "train.max_steps=2"], name)
    return {"set_up_s": fresh["startup/set_up_s"], "model_init_s": fresh["startup/model_init_s"],
            "resume_s": resumed["startup/resume_s"],
            "read_mb": resumed["startup/checkpoint_read_mb"], "shard_mb": shard / 2**20,
            "resume_set_up_s": resumed["startup/set_up_s"]}


def _train(args: argparse.Namespace, ep: int, overrides: list[str], name: str) -> dict[str, float]:
    """One run; rank 0's startup/* metrics of its first log row."""
    if ep == 1:
        cmd = [sys.executable, "-m", "peer_dist.cli", "train", *overrides]
    else:
        cmd = [sys.executable, "-m", "peer_dist.cli", "torchrun", "--standalone", f"--nproc-per-node={ep}", "train",
               *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"bench run {name} (EP {ep}) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir="))) / name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in reversed(rows) if "startup/set_up_s" in r)


def format_report(results: dict[str, Any]) -> str:
    lines = ["start-up and resume per rank (rank 0) as EP grows; the expert rows a rank holds fall as 1/EP",
             f"{'EP':>3} {'set-up s':>9} {'model init s':>13} {'resume s':>9} {'read MB':>9} {'shard MB':>9} "
             f"{'read vs EP 1':>13}"]
    first = next(iter(results["ep"].values()))
    for ep, r in results["ep"].items():
        lines.append(f"{ep:>3} {r['set_up_s']:>9.2f} {r['model_init_s']:>13.2f} {r['resume_s']:>9.2f} "
                     f"{r['read_mb']:>9.1f} {r['shard_mb']:>9.1f} "
                     f"{r['read_mb'] / first['read_mb']:>12.2f}x")
    return "\n".join(lines)
