"""Table and plot of launch/lifelong_experiment.sh: per variant, phase-B and phase-A validation
perplexity after phase B, forgetting (rise of phase-A loss over the end of phase A), parameters."""

from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path

from matplotlib.figure import Figure

from peer_dist.checkpoint.store import load_module_state, resolve_checkpoint


def loss(out: Path, run: str, data: str) -> float:
    line = next(x for x in (out / f"{run}.eval-{data}.txt").read_text().splitlines() if x.startswith("metrics: "))
    return json.loads(line.removeprefix("metrics: "))["val/loss"]


def params(out: Path, run: str) -> tuple[int, int]:
    """(trainable, total) parameters of the run's final model, from its config's train.trainable etc."""
    ckpt = resolve_checkpoint(out / run)
    weights = load_module_state(ckpt)
    train = tomllib.loads((ckpt.path / "config.toml").read_text())["train"]
    total = sum(v.numel() for k, v in weights.items() if v.is_floating_point() and "running" not in k)
    kind = train.get("trainable", "all")
    if kind == "added":
        trainable = sum(v.numel() for k, v in weights.items()
                        if ".added_peer." in k and v.is_floating_point() and "running" not in k)
    elif kind == "experts":
        t = train.get("sparse_experts", 0)
        width = next(v.shape[1] for k, v in weights.items() if k.endswith("experts.u"))
        trainable = 2 * t * width if t else sum(v.numel() for k, v in weights.items() if ".experts." in k)
    elif train.get("old_expert_lr_scale", 1.0) == 0:
        old = (int(math.isqrt(next(v.shape[0] for k, v in weights.items() if k.endswith("experts.u")))) // 2) ** 2
        width = next(v.shape[1] for k, v in weights.items() if k.endswith("experts.u"))
        trainable = total - 2 * old * width
    else:
        trainable = total
    return trainable, total


def main(out: Path) -> None:
    rows = []
    for run, base in (("a-dense-ft", "A-dense"), ("b-peer-ft", "A-peer"), ("c-grown-frozen", "A-peer"),
                      ("d-grown-all", "A-peer"), ("e-dense-added-peer", "A-dense"), ("f-sparse-256", "A-peer"),
                      ("f-sparse-2048", "A-peer")):
        trainable, total = params(out, run)
        b_ppl, a_ppl = math.exp(loss(out, run, "B")), math.exp(loss(out, run, "A"))
        rows.append((run, b_ppl, a_ppl, loss(out, run, "A") - loss(out, base, "A"), trainable, total))
    header = "variant\tB val ppl\tA val ppl after B\tforgetting (A loss rise, nats)\ttrainable\ttotal"
    lines = [header] + ["\t".join([r[0], f"{r[1]:.3f}", f"{r[2]:.3f}", f"{r[3]:+.4f}", str(r[4]), str(r[5])])
                        for r in rows]
    lines += [f"# end of phase A: A-peer A ppl {math.exp(loss(out, 'A-peer', 'A')):.3f} B ppl "
              f"{math.exp(loss(out, 'A-peer', 'B')):.3f}; A-dense A ppl {math.exp(loss(out, 'A-dense', 'A')):.3f} "
              f"B ppl {math.exp(loss(out, 'A-dense', 'B')):.3f}"]
    (out / "results.tsv").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, r in enumerate(rows):
        ax.scatter(r[1], r[3], color=f"C{i}", label=r[0])
    ax.set_xlabel("phase-B validation perplexity (man pages)")
    ax.set_ylabel("forgetting: rise of phase-A val loss (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "forgetting.png", dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
