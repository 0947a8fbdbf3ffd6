"""Sweep results: rows from each run folder, then results.csv, results.md and isoflop.png.

Every file is written to a temporary name and renamed into place (``os.replace``), so
a reader (or an interrupted sweep) sees the previous complete file or the new one,
never a part. Only finished runs carry numbers; the others are listed with their status.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer_dist.errors import UserError
from peer_dist.fileio import fsync_path, write_atomic
from peer_dist.sweep.plan import PlannedRun, human
from peer_dist.sweep.spec import flops_text

CSV_COLUMNS = (
    "budget", "method", "size", "run_name", "ffn", "status", "params_total", "params_active", "num_experts",
    "slots_per_token", "flops_per_token", "global_batch", "seq_len", "tokens_per_step", "steps", "tokens", "flops",
    "val_loss", "val_perplexity", "train_loss_last10pct", "train_loss_steps", "expert_layers", "expert_usage", "unevenness_kl", "wall_s",
)


@dataclass
class RunResult:
    """A planned run and what its run folder says about it (numbers only once it is done)."""

    run: PlannedRun
    status: str  # "done", "pending", "partial (step s of S)", "failed (exit N)", ...
    val_loss: float | None = None
    val_perplexity: float | None = None
    # Mean per-step training loss over the last TRAIN_LOSS_FRACTION of the run's steps (whole logged
    # intervals that end inside it, weighted by their steps), and how many steps that mean covers.
    train_loss: float | None = None
    train_loss_steps: int | None = None
    # {layer: {"expert_usage": u, "unevenness_kl": kl}} from the final validation row (PEER/PKM layers)
    experts: dict[str, dict[str, float]] = field(default_factory=dict)
    wall_s: float | None = None  # summed over the sweep's attempts at this run

    @property
    def done(self) -> bool:
        return self.status == "done"

    def mean_expert(self, key: str) -> float | None:
        values = [m[key] for m in self.experts.values() if key in m]
        return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------- reading a run folder


def read_metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a last line cut short by a killed process is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def final_validation(run_dir: Path, step: int, rows: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The last validation row (``val/loss``) written at ``step``: the run's final evaluation."""
    rows = read_metrics_rows(run_dir) if rows is None else rows
    matches = [r for r in rows if r.get("step") == step and "val/loss" in r]
    return matches[-1] if matches else None


TRAIN_LOSS_FRACTION = 0.1  # results.csv's train_loss_last10pct: the last 10 % of the steps


def train_loss_tail(rows: list[dict[str, Any]], steps: int,
                    fraction: float = TRAIN_LOSS_FRACTION) -> tuple[float | None, int | None]:
    """Mean per-step training loss over the last ``fraction`` of ``steps``, and the steps it covers.

    Each ``train/loss`` row is the mean over the steps since the previous logged row, so
    a row at step s after one at step p stands for s - p steps. Every interval that ends
    after step ``steps - ceil(fraction * steps)`` is taken whole (an interval is never
    cut: its per-step losses are not logged), weighted by its length::

        loss = sum_i (s_i - p_i) * loss_i / sum_i (s_i - p_i)

    A step logged twice (a rollback trained it again) counts with its last row.
    """
    last: dict[int, float] = {}
    for row in rows:
        if "train/loss" in row and isinstance(row.get("step"), int) and row["step"] <= steps:
            last[row["step"]] = float(row["train/loss"])
    start = steps - math.ceil(fraction * steps)
    total = weight = 0.0
    previous = 0
    for step in sorted(last):
        if step > start:
            total += (step - previous) * last[step]
            weight += step - previous
        previous = step
    if weight == 0:
        return None, None
    return total / weight, int(weight)


def result_from_folder(run: PlannedRun, status: str, wall_s: float | None) -> RunResult:
    result = RunResult(run, status, wall_s=wall_s)
    if status != "done":
        return result
    rows = read_metrics_rows(run.run_dir)
    row = final_validation(run.run_dir, run.steps, rows)
    if row is None:  # the caller's status said done; the folder disagrees
        result.status = "partial (no final validation)"
        return result
    result.val_loss, result.val_perplexity = float(row["val/loss"]), float(row["val/perplexity"])
    result.train_loss, result.train_loss_steps = train_loss_tail(rows, run.steps)
    for key, value in row.items():
        if key.startswith("experts/"):
            _, layer, metric = key.split("/", 2)
            result.experts.setdefault(layer, {})[metric] = float(value)
    return result


# ---------------------------------------------------------------------------- writing


def describe_data(path: str) -> str:
    """One line naming a prepared data folder from its manifest: what the runs really trained on."""
    from peer_dist.data import Manifest

    try:
        manifest = Manifest.load(path)
    except UserError as exc:
        return f"{path} (manifest unreadable: {exc})"
    corpus = manifest.info.get("corpus", {})
    if corpus.get("default_stdlib"):
        source = f"Python {corpus.get('python', '')} standard library source".replace("Python  ", "Python ")
    else:
        inputs = [Path(str(i)).name or str(i) for i in corpus.get("inputs", [])]
        source = ", ".join(inputs[:3]) + (f" +{len(inputs) - 3} more" if len(inputs) > 3 else "") or "?"
    if corpus.get("truncated"):
        source += " (cut by --max-bytes)"
    train_tokens = manifest.info["splits"]["train"]["tokens"]
    return (f"{Path(path).name}: {source}, {manifest.tokenizer} tokenizer, seq {manifest.seq_len}, "
            f"{human(train_tokens)} train tokens, fingerprint {manifest.fingerprint[:12]}")


def write_results(output: Path, results: Sequence[RunResult], title: str, data: Sequence[str] = ()) -> list[Path]:
    """results.csv, results.md and (with at least one finished run) isoflop.png in ``output``.

    ``data``: one line per data folder the runs use (:func:`describe_data`), shown under the title.
    """
    written = [output / "results.csv", output / "results.md"]
    write_atomic(written[0], format_csv(results))
    write_atomic(written[1], format_markdown(results, title, data))
    if any(r.done for r in results):
        plot_isoflop(results, output / "isoflop.png", title, data)
        written.append(output / "isoflop.png")
    return written


def _num(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def format_csv(results: Sequence[RunResult]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for res in results:
        r = res.run
        writer.writerow([
            _num(r.budget), r.method, r.size, r.name, r.ffn, res.status, r.params_total, r.params_active,
            _num(r.num_experts), _num(r.slots_per_token), _num(r.flops_per_token), r.global_batch, r.seq_len,
            r.tokens_per_step, r.steps, r.tokens, _num(r.flops), _num(res.val_loss), _num(res.val_perplexity),
            _num(res.train_loss), _num(res.train_loss_steps), len(res.experts) if res.experts else "", _num(res.mean_expert("expert_usage")),
            _num(res.mean_expert("unevenness_kl")), _num(None if res.wall_s is None else round(res.wall_s, 1)),
        ])
    return buf.getvalue()


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A markdown table; ``align`` has one letter per column: l(eft) or r(ight)."""
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ppl(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def best_per_method(results: Sequence[RunResult]) -> dict[tuple[float, str], RunResult]:
    """Paper Table 1: for each (budget, method), the finished run with the lowest validation perplexity."""
    best: dict[tuple[float, str], RunResult] = {}
    for res in results:
        if res.done:
            key = (res.run.budget, res.run.method)
            if key not in best or res.val_perplexity < best[key].val_perplexity:
                best[key] = res
    return best


def format_markdown(results: Sequence[RunResult], title: str, data: Sequence[str] = ()) -> str:
    lines = [f"# isoFLOP sweep: {title}", ""]
    lines += [f"Data: {line}" + ("  " if i < len(data) - 1 else "") for i, line in enumerate(data)]
    lines += [""] if data else []
    done = sum(r.done for r in results)
    lines += [f"{done} of {len(results)} runs finished. Perplexity: validation, at the end of training. "
              "FLOPs: training (forward + backward) FLOPs per token, peer_dist/model/flops.py.", ""]
    budgets = list(dict.fromkeys(r.run.budget for r in results))
    for budget in budgets:
        rows = []
        for res in (r for r in results if r.run.budget == budget):
            r = res.run
            rows.append([r.method, r.size, r.ffn, human(r.params_total), human(r.params_active),
                         flops_text(r.flops_per_token), str(r.steps), human(r.tokens), _ppl(res.val_perplexity),
                         res.status])
        lines += [f"## Budget {flops_text(budget)} FLOPs", ""]
        lines += _table(["method", "size", "ffn", "params total", "params active", "FLOPs/token", "steps", "tokens",
                         "val ppl", "status"], rows, "lllrrrrrrl")
        lines.append("")
    lines += _best_section(results, budgets)
    lines += _usage_section(results)
    return "\n".join(lines)


def _best_section(results: Sequence[RunResult], budgets: list[float]) -> list[str]:
    best = best_per_method(results)
    lines = ["## Best model per method and budget (paper Table 1)", ""]
    if not best:
        return lines + ["No finished runs yet.", ""]
    rows = []
    for budget in budgets:
        for method in dict.fromkeys(r.run.method for r in results):
            res = best.get((budget, method))
            if res is not None:
                r = res.run
                rows.append([flops_text(budget), method, r.size, human(r.params_total), human(r.params_active),
                             str(r.steps), _ppl(res.val_perplexity)])
    lines += _table(["budget", "method", "best size", "params total", "params active", "steps", "val ppl"], rows,
                    "llrrrrr")
    return lines + [""]


def _usage_section(results: Sequence[RunResult]) -> list[str]:
    lines = ["## Expert usage and unevenness (paper Table 2)", "",
             "Usage: fraction of the layer's experts (PEER) or value slots (PKM) retrieved at least once on the "
             "validation batches. Unevenness: KL(usage || uniform) of the accumulated gate mass, 0 = perfectly "
             "even.", ""]
    rows = []
    for res in results:
        r = res.run
        if r.ffn not in ("peer", "pkm") or not res.done:
            continue
        for layer, metrics in res.experts.items():
            rows.append([flops_text(r.budget), r.method, r.size, layer, human(r.num_experts or 0),
                         str(r.slots_per_token), f"{100 * metrics.get('expert_usage', math.nan):.1f}%",
                         f"{metrics.get('unevenness_kl', math.nan):.3f}"])
    if not rows:
        return lines + ["No finished PEER or PKM runs yet.", ""]
    lines += _table(["budget", "method", "size", "layer", "N", "h·k", "expert usage", "unevenness KL"], rows,
                    "llllrrrr")
    return lines + [""]


def plot_isoflop(results: Sequence[RunResult], path: Path, title: str, data: Sequence[str] = ()) -> None:
    """Paper Figure 1: validation perplexity vs total parameters (log x), a line per method, a panel per budget."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state (renders with Agg)

    budgets = list(dict.fromkeys(r.run.budget for r in results))
    methods = list(dict.fromkeys(r.run.method for r in results))
    fig = Figure(figsize=(5.0 * len(budgets), 4.2), layout="constrained")
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    markers = "osD^vP*Xh"
    for ax, budget in zip(axes, budgets):
        for i, method in enumerate(methods):
            points = sorted((r.run.params_total, r.val_perplexity) for r in results
                            if r.done and r.run.budget == budget and r.run.method == method)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker=markers[i % len(markers)], label=method, color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xlabel("total parameters")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"{flops_text(budget)} FLOPs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    heading = "\n".join([textwrap.fill(f"isoFLOP: {title}", width=55 * len(budgets))]
                        + [textwrap.fill(f"data: {line}", width=70 * len(budgets)) for line in data])
    fig.suptitle(heading, fontsize="medium")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
