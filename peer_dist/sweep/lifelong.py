"""`peer-dist lifelong`: the forgetting experiment of docs/lifelong.md, resumable, from one command.

Phase A trains a PEER model and its dense counterpart on the default corpus. Phase B
continues each variant on another corpus at EQUAL TRAINING FLOPs::

    budget  = b_steps * training_flops_per_token(variant a) * tokens_per_step
    steps_v = floor(budget / (training_flops_per_token(variant v) * tokens_per_step))

(``training_flops_per_token`` counts what a variant's training computes: frozen weights get
no weight gradient and nothing flows below the lowest trained weight; see
peer_dist/model/flops.py.) So a variant that trains little gets more steps on B.

Every step is one subprocess (`peer-dist train`, `grow`, `usage`, `eval`). A finished one is
never run again: a train run whose newest checkpoint is at its planned step is skipped, grow
and usage skip outputs that exist, evaluations skip result files that exist. An interrupted
train run resumes from its newest checkpoint (written every ``--ckpt-interval`` steps).

Output folder: the runs, ``<run>.eval-{A,B}.txt`` (and ``a-dense-ft.<step>.eval-{A,B}.txt`` for
every checkpoint of dense fine-tuning: its forgetting curve), ``logs/<step>.log``, ``plan.json``
(the steps per variant), ``results.tsv``, ``results.md`` and ``forgetting.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from peer_dist.errors import EXIT_USER_ERROR, ConfigError

PHASE_A = {"A-peer": [], "A-dense": ["model.ffn=dense"]}


@dataclass(frozen=True)
class Variant:
    """One phase-B variant: trained from ``base`` (a phase-A run), optionally grown first."""

    name: str
    label: str
    base: str
    overrides: list[str] = field(default_factory=list)
    grow: bool = False  # `peer-dist grow` to 4x the experts (2x the sub-keys per half) first


def variants(sparse_t: list[int], lora_rank: int, usage: Path, sparse_lr_scale: float = 1.0) -> list[Variant]:
    """Variants (a)-(g) of the experiment (docs/lifelong.md)."""
    out = [
        Variant("a-dense-ft", "(a) dense, fine-tuned", "A-dense"),
        Variant("b-peer-ft", "(b) PEER, fine-tuned as is", "A-peer"),
        Variant("c-grown-frozen", "(c) PEER grown 4x, old experts frozen", "A-peer",
                ["train.old_expert_lr_scale=0"], grow=True),
        Variant("d-grown-all", "(d) PEER grown 4x, all trainable", "A-peer", grow=True),
        Variant("e-dense-added-peer", "(e) frozen dense + residual PEER in the middle block", "A-dense",
                ["model.add_peer=residual", "train.trainable=added"]),
    ]
    out += [Variant(f"f-sparse-{t}", f"(f) PEER, sparse expert finetuning, t = {t}", "A-peer",
                    ["train.trainable=experts", f"train.sparse_experts={t}", f"train.table_lr_scale={sparse_lr_scale}",
                     f"train.sparse_experts_background={usage}"]) for t in sparse_t]
    out.append(Variant(f"g-dense-lora-{lora_rank}", f"(g) dense + LoRA r = {lora_rank} (peft)", "A-dense",
                       [f"train.lora_rank={lora_rank}"]))
    return out


class Experiment:
    def __init__(self, args: argparse.Namespace) -> None:
        self.out = Path(args.output)
        self.args = args
        self.usage = self.out / "A-peer-usage.pt"
        self.variants = variants(args.sparse_t, args.lora_rank, self.usage, args.sparse_lr_scale)
        common = ["train.progress=false", "train.eval_interval=0", f"train.ckpt_interval={args.ckpt_interval}",
                  "train.ckpt_keep=1000", f"run.dir={self.out}"]  # every checkpoint: (a)'s forgetting curve
        self.phase_a = [f"data.path={args.data_a}", f"train.max_steps={args.a_steps}", *common]
        self.phase_b = [f"data.path={args.data_b}", f"train.warmup_steps={args.warmup}", f"train.lr={args.lr}",
                        *common]

    # ------------------------------------------------------------------ steps

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        for path in (self.args.data_a, self.args.data_b):
            if not (Path(path) / "manifest.json").is_file():
                raise ConfigError(f"no prepared data at {path}: prepare phase A's with `peer-dist prepare` and "
                                  "phase B's with `bash launch/prepare_manpages.sh` (see docs/lifelong.md)")
        for name, extra in PHASE_A.items():
            self._train(name, self.args.a_steps, [f"run.name={name}", *self.args.overrides, *extra, *self.phase_a])
        if not self.usage.is_file():
            self._call("usage", ["usage", str(self.out / "A-peer"), "-o", str(self.usage), "--batches", "50"])
        plan = self.plan()
        (self.out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        for v in self.variants:
            self._phase_b(v, plan[v.name]["steps"])
        for run in [*PHASE_A, *(v.name for v in self.variants)]:
            for data, path in (("A", self.args.data_a), ("B", self.args.data_b)):
                file = self.out / f"{run}.eval-{data}.txt"
                if not (file.is_file() and file.stat().st_size):
                    text = self._call(f"eval-{run}-{data}", ["eval", str(self.out / run), "--data", str(path),
                                                             "--batches", str(self.args.eval_batches)])
                    file.write_text(text)
        self._dense_curve()
        from peer_dist.sweep.lifelong_results import write_results

        print(write_results(self.out, self.variants, plan))
        return 0

    def _dense_curve(self) -> None:
        """Evaluate checkpoints of dense fine-tuning (a): its forgetting as B perplexity falls, the reference
        "at the same phase-B perplexity" (lifelong_results.dense_forgetting_at). Forgetting rises fastest
        at the start, so the curve takes every checkpoint of the first tenth of phase B (steps // 100
        apart) and one per tenth after it."""
        from peer_dist.checkpoint.store import list_checkpoints

        tenth = max(1, self.args.b_steps // 10)
        for ckpt in list_checkpoints(self.out / "a-dense-ft" / "checkpoints"):
            if ckpt.step > tenth and ckpt.step % tenth:
                continue
            for data, path in (("A", self.args.data_a), ("B", self.args.data_b)):
                file = self.out / f"a-dense-ft.{ckpt.path.name}.eval-{data}.txt"
                if not (file.is_file() and file.stat().st_size):
                    file.write_text(self._call(f"eval-a-dense-ft-{ckpt.path.name}-{data}", [
                        "eval", str(ckpt.path), "--data", str(path), "--batches", str(self.args.eval_batches)]))

    def _phase_b(self, v: Variant, steps: int) -> None:
        overrides = [f"run.name={v.name}", f"train.max_steps={steps}", *self.phase_b, *v.overrides]
        if v.name == "a-dense-ft":  # checkpoints for the curve of its forgetting along phase B (_dense_curve)
            overrides.append(f"train.ckpt_interval={max(1, steps // 100)}")
        if not v.grow:
            self._train(v.name, steps, ["--init-from", str(self.out / v.base), *overrides])
            return
        if not (self.out / v.name / "config.toml").is_file():
            self._call(f"grow-{v.name}", ["grow", str(self.out / v.base), "--num-experts", str(self._grown(v)),
                                          "-o", str(self.out / v.name), *overrides])
        self._train(v.name, steps, ["-c", str(self.out / v.name / "config.toml"), f"train.max_steps={steps}"])

    def variant_config(self, v: Variant) -> object:
        """The config the variant trains with (before any run exists: grown ones as grow writes them)."""
        from peer_dist.config import load_config

        base = self.out / v.base / "config.toml"
        extra = [f"train.init_from={self.out / v.base}"] if not v.grow else [
            f"model.peer.num_experts={self._grown(v)}",
            f"model.peer.grown_from={math.isqrt(load_config(base).model.peer.num_experts)}"]
        return load_config(base, [*self.phase_b, *v.overrides, *extra, f"run.name={v.name}"])

    def _grown(self, v: Variant) -> int:
        """Experts per PEER layer after growth: (2n)^2 for the base's n^2."""
        from peer_dist.config import load_config

        return 4 * load_config(self.out / v.base / "config.toml").model.peer.num_experts

    def plan(self) -> dict[str, dict[str, float]]:
        """Phase-B steps per variant at the FLOPs of ``b_steps`` steps of variant (a) (module docstring)."""
        from peer_dist.data import Manifest
        from peer_dist.model.flops import training_flops_per_token
        from peer_dist.sweep.plan import steps_for_budget

        manifest = Manifest.load(self.args.data_b)
        tokens = 0
        plan: dict[str, dict[str, float]] = {}
        budget = 0.0
        for v in self.variants:
            cfg = self.variant_config(v)
            tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * manifest.seq_len
            fpt = training_flops_per_token(cfg, cfg.model.vocab_size or manifest.vocab_size, manifest.seq_len)
            if not budget:  # the first variant, (a), sets the budget
                budget = self.args.b_steps * fpt * tokens
            steps = steps_for_budget(budget, fpt, tokens)
            plan[v.name] = {"steps": steps, "flops_per_token": fpt, "flops": steps * fpt * tokens}
        return plan

    def _train(self, name: str, steps: int, args: list[str]) -> None:
        from peer_dist.checkpoint.store import list_checkpoints

        done = list_checkpoints(self.out / name / "checkpoints")
        if done and done[0].step >= steps:
            return
        self._call(f"train-{name}", ["train", *args])

    def _call(self, what: str, args: list[str]) -> str:
        """Run `peer-dist ARGS`; its output goes to logs/WHAT.log (appended), stdout is returned."""
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        print(f"lifelong: {what}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "peer_dist.cli", *args], capture_output=True, text=True)
        with open(logs / f"{what}.log", "a") as fh:
            fh.write(f"$ peer-dist {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, ["peer-dist", *args], proc.stdout,
                                                f"{proc.stderr[-3000:]}\n(log: {logs / f'{what}.log'})")
        return proc.stdout


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", default="runs/lifelong", help="experiment folder [runs/lifelong]")
    p.add_argument("--data-a", default="data/stdlib-byte", help="phase-A data (prepared) [data/stdlib-byte]")
    p.add_argument("--data-b", default="data/manpages-byte",
                   help="phase-B data [data/manpages-byte, from launch/prepare_manpages.sh]")
    p.add_argument("--a-steps", type=int, default=300, help="phase-A steps [300]")
    p.add_argument("--b-steps", type=int, default=100,
                   help="phase-B budget: the training FLOPs of this many steps of dense fine-tuning (a) [100]")
    p.add_argument("--lr", type=float, default=1e-3, help="phase-B peak learning rate [1e-3]")
    p.add_argument("--warmup", type=int, default=10, help="phase-B warmup steps [10]")
    p.add_argument("--sparse-t", type=int, nargs="+", default=[256, 2048],
                   help="experts per layer updated by variant (f), one run per value [256 2048]")
    p.add_argument("--sparse-lr-scale", type=float, default=10.0,
                   help="variant (f): the selected rows' learning rate / --lr (train.table_lr_scale); sparse "
                        "memory finetuning trains its few slots at a much higher rate than full finetuning [10]")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of variant (g)'s LoRA adapters [8]")
    p.add_argument("--eval-batches", type=int, default=40, help="validation batches per evaluation [40]")
    p.add_argument("--ckpt-interval", type=int, default=50, help="checkpoint interval of every run [50]")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config keys of the phase-A runs (the model: phase B inherits it), e.g. model.d_model=64")


def run(args: argparse.Namespace) -> int:
    try:
        return Experiment(args).run()
    except subprocess.CalledProcessError as exc:
        print(f"peer-dist lifelong: `{' '.join(exc.cmd)}` failed (exit {exc.returncode}):\n{exc.stderr}",
              file=sys.stderr)
        return EXIT_USER_ERROR if exc.returncode == EXIT_USER_ERROR else 1
