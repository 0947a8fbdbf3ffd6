"""`peer-dist sweep SPEC --output DIR`: plan, train (skipping finished runs), tabulate and plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peer_dist.errors import EXIT_USER_ERROR

from peer_dist.sweep.plan import LAUNCHERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="sweep spec (TOML), e.g. configs/sweeps/tiny.toml")
    parser.add_argument("--output", "-o", required=True,
                        help="sweep folder: runs/, configs/, logs/, results.csv, results.md, isoflop.png")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none",
                        help="how each run starts: one plain process (none) or torchrun --standalone")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run under --launcher torchrun (sets the global batch, hence the steps)")
    parser.add_argument("--jobs", "-j", type=int, default=1,
                        help="runs trained at once (each its own process; OMP_NUM_THREADS = cores / jobs "
                             "unless set); tuning, main runs and extra seeds still run one stage after another")
    parser.add_argument("--only", nargs="+", metavar="METHOD[/SIZE]", default=None,
                        help="plan and run only these methods (peer) or sizes of a method (peer/d96)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config keys for every run, applied like the spec's [overrides] "
                             "(method and size keys still win), e.g. data.path=data/my-corpus")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (params, FLOPs/token, steps, tokens, status) and exit; writes nothing")


def run(args: argparse.Namespace) -> int:
    from peer_dist.sweep.plan import Launch, format_plan, human
    from peer_dist.sweep.runner import SweepRunner
    from peer_dist.sweep.spec import flops_text, load_spec, with_overrides

    if args.only:  # `--only peer key=value`: the nargs="+" list also took the overrides after it
        args.overrides += [word for word in args.only if "=" in word]
        args.only = [word for word in args.only if "=" not in word] or None
    launch = Launch(args.launcher, args.nproc)
    spec = with_overrides(load_spec(args.spec), args.overrides)
    output = Path(args.output)
    runner = SweepRunner(spec, output, launch, args.only, args.jobs)
    runs = runner.all_runs
    procs = f"{launch.nproc} process{'es' if launch.nproc > 1 else ''}"
    tuning = f" ({len(runner.tune_runs)} tuning)" if runner.tune_runs else ""
    print(f"sweep {spec.path}: {len(runs)} runs{tuning}, {len(spec.budgets)} budget(s), "
          f"launcher {launch.launcher} x {procs}, {args.jobs} at a time, "
          f"{human(sum(r.tokens for r in runs))} tokens, {flops_text(sum(r.flops for r in runs))} training FLOPs in all",
          flush=True)
    if args.dry_run:
        conflicts: list[str] = []
        states = runner.states(conflicts)
        print(format_plan(runs, {name: state.status for name, state in states.items()}))
        for method, choice in runner.choices().items() if runner.tune_runs else ():
            if choice.chosen is not None:
                print(f"{method}: chosen on the tuning split: "
                      + ", ".join(f"{k} = {v:g}" for k, v in choice.chosen.items()))
        for message in conflicts:
            print(f"conflict: {message}", file=sys.stderr)
        return EXIT_USER_ERROR if conflicts else 0
    return runner.execute()
