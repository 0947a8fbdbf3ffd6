"""Table and plot of `peer-dist lifelong` (peer_dist/sweep/lifelong.py).

Per variant: phase-B steps and training FLOPs, phase-B validation perplexity, phase-A
validation perplexity after phase B, forgetting (the rise of the phase-A validation loss,
in nats, over the variant's phase-A starting point: the end of phase A), forgetting
relative to dense fine-tuning's (variant a) at its end, the same relative to what dense
fine-tuning forgot when it was at the variant's phase-B perplexity, trainable and total
parameters.

Dense fine-tuning "at the same phase-B perplexity": its checkpoints trace forgetting
against phase-B perplexity, from (B perplexity at the end of phase A, 0) down to its final
point; the forgetting at a variant's B perplexity is the linear interpolation between the
two neighbouring points. A variant whose B perplexity lies outside that range has no
such reference (it learned B better than dense fine-tuning did, or not at all).
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

from peer_dist.config import Config, from_dict


def eval_loss(out: Path, run: str, data: str) -> float:
    """val/loss of ``<run>.eval-<data>.txt`` (the `metrics: {...}` line of `peer-dist eval`)."""
    text = (out / f"{run}.eval-{data}.txt").read_text()
    line = next(x for x in text.splitlines() if x.startswith("metrics: "))
    return float(json.loads(line.removeprefix("metrics: "))["val/loss"])


def dense_curve(out: Path) -> list[tuple[float, float]]:
    """(phase-B perplexity, forgetting) of dense fine-tuning's checkpoints and its start, by perplexity."""
    start = eval_loss(out, "A-dense", "A")
    points = [(math.exp(eval_loss(out, "A-dense", "B")), 0.0)]
    for file in sorted(out.glob("a-dense-ft.step_*.eval-B.txt")):
        run = file.name.removesuffix(".eval-B.txt")
        points.append((math.exp(eval_loss(out, run, "B")), eval_loss(out, run, "A") - start))
    return sorted(points)


def dense_forgetting_at(curve: list[tuple[float, float]], ppl: float) -> float | None:
    """Dense fine-tuning's forgetting at phase-B perplexity ``ppl`` (linear between neighbours), or None
    outside the curve."""
    for (p0, f0), (p1, f1) in zip(curve, curve[1:]):
        if p0 <= ppl <= p1:
            return f0 + (f1 - f0) * (ppl - p0) / (p1 - p0) if p1 > p0 else f0
    return None


def param_counts(cfg: Config, vocab: int) -> tuple[int, int]:
    """(trainable, total) parameters of the model ``cfg`` trains.

    Trainable: what the optimizer updates, from the model as the trainer freezes it
    (train.trainable, LoRA adapters); of a grown model with old experts frozen
    (train.old_expert_lr_scale = 0) the new rows only; with train.sparse_experts = t, the
    t selected experts' rows per PEER layer (a new selection each step).
    """
    from peer_dist.model import PEER, build_model
    from peer_dist.model.lora import apply_lora
    from peer_dist.train.engine import freeze_outside, table_parameters

    model = apply_lora(build_model(cfg.model, vocab), cfg.train)
    freeze_outside(model, cfg.train.trainable)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tables = {id(p) for p in table_parameters(model) if p.requires_grad}
    for layer in (m for m in model.modules() if isinstance(m, PEER)):
        width = layer.expert_u.shape[1] + layer.expert_v.shape[1]  # u and v rows of one expert
        if cfg.train.sparse_experts and id(layer.expert_u) in tables:
            trainable -= layer.expert_u.shape[0] * width - cfg.train.sparse_experts * width
        elif cfg.train.old_expert_lr_scale == 0 and id(layer.expert_u) in tables:
            trainable -= cfg.model.peer.grown_from ** 2 * width
    return trainable, total


def _config(out: Path, run: str) -> Config:
    from peer_dist.checkpoint.store import resolve_checkpoint

    ckpt = resolve_checkpoint(out / run)
    return from_dict(tomllib.loads((ckpt.path / "config.toml").read_text()))


def _vocab(cfg: Config) -> int:
    from peer_dist.data import Manifest

    return cfg.model.vocab_size or Manifest.load(cfg.data.path).vocab_size


def write_results(out: Path, variants: list[Any], plan: dict[str, dict[str, float]]) -> str:
    """results.tsv, results.md and forgetting.png under ``out``; returns the markdown table."""
    start = {base: eval_loss(out, base, "A") for base in ("A-peer", "A-dense")}
    rows = []
    for v in variants:
        cfg = _config(out, v.name)
        trainable, total = param_counts(cfg, _vocab(cfg))
        a_loss, b_loss = eval_loss(out, v.name, "A"), eval_loss(out, v.name, "B")
        rows.append({"variant": v.name, "label": v.label, "steps": int(plan[v.name]["steps"]),
                     "flops": plan[v.name]["flops"], "b_ppl": math.exp(b_loss), "a_ppl": math.exp(a_loss),
                     "forgetting": a_loss - start[v.base], "trainable": trainable, "total": total})
    dense = next(r["forgetting"] for r in rows if r["variant"] == "a-dense-ft")
    curve = dense_curve(out)
    for r in rows:
        r["relative"] = r["forgetting"] / dense if dense > 0 else float("nan")
        at = dense_forgetting_at(curve, r["b_ppl"])
        r["dense_at_same_b"] = float("nan") if at is None else at
        r["relative_at_same_b"] = r["forgetting"] / at if at else float("nan")
    keys = ["variant", "steps", "flops", "b_ppl", "a_ppl", "forgetting", "relative", "dense_at_same_b",
            "relative_at_same_b", "trainable", "total"]
    tsv = ["\t".join(keys)] + ["\t".join(_cell(r[k]) for k in keys) for r in rows]
    (out / "results.tsv").write_text("\n".join(tsv) + "\n")
    md = ["| variant | phase-B steps | phase-B FLOPs | B val ppl | A val ppl after B | forgetting (nats) "
          "| / dense's final | dense's at this B ppl | / that | trainable | total |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for base, label in (("A-peer", "end of phase A: PEER"), ("A-dense", "end of phase A: dense")):
        cfg = _config(out, base)
        total = param_counts(cfg, _vocab(cfg))[1]
        md.append(f"| {label} | | | {math.exp(eval_loss(out, base, 'B')):.3f} | {math.exp(start[base]):.3f} "
                  f"| | | | | | {total:,} |")
    for r in rows:
        at = "—" if math.isnan(r["dense_at_same_b"]) else f"{r['dense_at_same_b']:+.4f}"
        ratio = "—" if math.isnan(r["relative_at_same_b"]) else f"{r['relative_at_same_b']:.2f}"
        md.append(f"| {r['label']} | {r['steps']} | {r['flops']:.3g} | {r['b_ppl']:.3f} | {r['a_ppl']:.3f} "
                  f"| {r['forgetting']:+.4f} | {r['relative']:.2f} | {at} | {ratio} | {r['trainable']:,} "
                  f"| {r['total']:,} |")
    (out / "results.md").write_text("\n".join(md) + "\n")
    _plot(out / "forgetting.png", rows, curve)
    return "\n".join(md)


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _plot(path: Path, rows: list[dict[str, Any]], curve: list[tuple[float, float]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot([p for p, _ in curve], [f for _, f in curve], color="grey", linewidth=1,
            label="dense fine-tuning along phase B (its checkpoints)")
    ax.plot([p for p, _ in curve], [f / 4 for _, f in curve], color="grey", linestyle=":", linewidth=1,
            label="a quarter of that: the target")
    for i, r in enumerate(rows):
        ax.scatter(r["b_ppl"], r["forgetting"], color=f"C{i % 10}", marker="os^D"[i // 10 % 4], label=r["label"])
    ax.set_xlabel("phase-B validation perplexity (man pages), lower is better")
    ax.set_ylabel("forgetting: rise of phase-A val loss (nats)")
    ax.set_title("phase B at equal training FLOPs")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
