"""Sweep results: rows from each run folder, then results.csv, results.md, isoflop.png (and tuning.csv).

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
from peer_dist.sweep.stats import (NOISE_SIGMAS, Bracket, Choice, Point, Stat, aggregate, bracketing, choose, compare,
                                   difference)

CSV_COLUMNS = (
    "budget", "method", "size", "seed", "run_name", "ffn", "status", "params_total", "params_active", "num_experts",
    "slots_per_token", "flops_per_token", "global_batch", "seq_len", "tokens_per_step", "steps", "tokens", "flops",
    "lr", "table_lr_scale", "val_loss", "val_perplexity", "train_loss_last10pct", "train_loss_steps",
    "expert_layers", "expert_usage", "unevenness_kl", "subkey_usage", "wall_s",
)
TUNING_COLUMNS = ("method", "size", "seed", "run_name", "status", "lr", "table_lr_scale", "steps", "flops",
                  "tune_loss", "chosen")


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


def write_results(output: Path, results: Sequence[RunResult], title: str, data: Sequence[str] = (),
                  tuning: Sequence[RunResult] = ()) -> list[Path]:
    """results.csv, results.md, (with a finished run) isoflop.png and (with tuning runs) tuning.csv in ``output``.

    ``data``: one line per data folder the runs use (:func:`describe_data`), shown under the title.
    ``tuning``: the [tune] grid runs (their val_loss is the tuning split's).
    """
    written = [output / "results.csv", output / "results.md"]
    choices = choose(tuning)
    write_atomic(written[0], format_csv(results))
    write_atomic(written[1], format_markdown(results, title, data, tuning))
    if any(r.done for r in results):
        plot_isoflop(results, output / "isoflop.png", title, data)
        written.append(output / "isoflop.png")
    if tuning:
        written.append(output / "tuning.csv")
        write_atomic(written[-1], format_tuning_csv(tuning, choices))
    return written


def _num(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _lrs(run: PlannedRun) -> tuple[float, float]:
    return run.cfg.train.lr, run.cfg.train.table_lr_scale


def format_csv(results: Sequence[RunResult]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for res in results:
        r = res.run
        writer.writerow([
            _num(r.budget), r.method, r.size, r.seed, r.name, r.ffn, res.status, r.params_total, r.params_active,
            _num(r.num_experts), _num(r.slots_per_token), _num(r.flops_per_token), r.global_batch, r.seq_len,
            r.tokens_per_step, r.steps, r.tokens, _num(r.flops), *(_num(v) for v in _lrs(r)), _num(res.val_loss),
            _num(res.val_perplexity), _num(res.train_loss), _num(res.train_loss_steps),
            len(res.experts) if res.experts else "", _num(res.mean_expert("expert_usage")),
            _num(res.mean_expert("unevenness_kl")), _num(res.mean_expert("subkey_usage")),
            _num(None if res.wall_s is None else round(res.wall_s, 1)),
        ])
    return buf.getvalue()


def format_tuning_csv(tuning: Sequence[RunResult], choices: dict[str, Choice]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TUNING_COLUMNS)
    for res in tuning:
        r = res.run
        chosen = choices[r.method].chosen == r.settings if r.method in choices else False
        writer.writerow([r.method, r.size, r.seed, r.name, res.status, *(_num(v) for v in _lrs(r)), r.steps,
                         _num(r.flops), _num(res.val_loss), "yes" if chosen else ""])
    return buf.getvalue()


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A markdown table; ``align`` has one letter per column: l(eft) or r(ight)."""
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _stat(value: Stat | None, fmt: str = ".3f") -> str:
    return "" if value is None else value.text(fmt)


def _point_status(point: Point) -> str:
    statuses = [r.status for r in point.results]
    if len(set(statuses)) == 1:
        return statuses[0]
    return f"{point.done} of {len(statuses)} done; " + "; ".join(s for s in dict.fromkeys(statuses) if s != "done")


def format_markdown(results: Sequence[RunResult], title: str, data: Sequence[str] = (),
                    tuning: Sequence[RunResult] = ()) -> str:
    lines = [f"# isoFLOP sweep: {title}", ""]
    lines += [f"Data: {line}" + ("  " if i < len(data) - 1 else "") for i, line in enumerate(data)]
    lines += [""] if data else []
    points = aggregate(results)
    done = sum(r.done for r in results)
    seeds = max((len(p.results) for p in points), default=1)
    lines += [f"{done} of {len(results)} runs finished ({seeds} seed(s) per point). Perplexity: validation split, "
              "at the end of training; with several seeds, mean ± sample standard deviation over them (n = seeds "
              "finished). FLOPs: training (forward + backward) FLOPs per token, peer_dist/model/flops.py.", ""]
    if tuning:
        lines += _tuning_section(tuning)
    budgets = list(dict.fromkeys(r.run.budget for r in results))
    for budget in budgets:
        rows = []
        for point in (p for p in points if p.budget == budget):
            r = point.run
            rows.append([r.method, r.size, r.ffn, human(r.params_total), human(r.params_active),
                         flops_text(r.flops_per_token), str(r.steps), human(r.tokens), _stat(point.ppl),
                         _point_status(point)])
        lines += [f"## Budget {flops_text(budget)} FLOPs", ""]
        lines += _table(["method", "size", "ffn", "params total", "params active", "FLOPs/token", "steps", "tokens",
                         "val ppl", "status"], rows, "lllrrrrrrl")
        lines.append("")
    brackets = bracketing(points)
    lines += _best_section(brackets)
    lines += _noise_section(brackets, points)
    lines += _usage_section(points)
    return "\n".join(lines)


def _tuning_section(tuning: Sequence[RunResult]) -> list[str]:
    choices = choose(tuning)
    first = tuning[0].run
    lines = ["## Learning rates, chosen on the tuning split", "",
             f"Every method trains its grid at size {first.size} on {flops_text(first.budget)} FLOPs per run (the "
             "same budget for every method) and is scored on the data's tuning split (data.eval_split = \"tune\"), "
             "never on the validation split the tables below report. The chosen point has the lowest mean "
             "tuning loss over its seeds; all runs below use it.", ""]
    rows = []
    for method, choice in choices.items():
        chosen = "waiting for its grid" if choice.chosen is None else \
            ", ".join(f"{k} = {v:g}" for k, v in choice.chosen.items())
        rows.append([method, chosen, str(len(choice.points)), str(choice.runs), flops_text(choice.flops),
                     "; ".join(choice.edges)])
    lines += _table(["method", "chosen", "grid points", "runs", "tuning FLOPs", "note"], rows, "llrrrl")
    lines += ["", "Grid (tuning-split loss):", ""]
    rows = []
    for method, choice in choices.items():
        for settings, loss, done_runs, total in choice.points:
            mark = " **chosen**" if settings == choice.chosen else ""
            rows.append([method, ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in settings.items()),
                         _stat(loss, ".4f") + mark, f"{done_runs} of {total}"])
    lines += _table(["method", "settings", "tune loss", "runs done"], rows, "llrr")
    return lines + [""]


def _best_section(brackets: Sequence[Bracket]) -> list[str]:
    lines = ["## Best model per method and budget (paper Table 1)", ""]
    found = [b for b in brackets if b.best is not None]
    if not found:
        return lines + ["No finished runs yet.", ""]
    rows = []
    for b in found:
        r = b.best.run
        rows.append([flops_text(b.budget), b.method, r.size, human(r.params_total), human(r.params_active),
                     str(r.steps), _stat(b.best.ppl), "yes" if b.bracketed else "no"])
    lines += _table(["budget", "method", "best size", "params total", "params active", "steps", "val ppl",
                     "bracketed"], rows, "llrrrrrl")
    lines += ["", "Bracketing (per curve and budget, sizes ordered by total parameters; a minimum is bracketed "
              "when a finished size on each side has a higher mean perplexity):", ""]
    lines += [f"- {flops_text(b.budget)}, {b.method}: {b.text}" for b in brackets]
    return lines + [""]


def _noise_section(brackets: Sequence[Bracket], points: Sequence[Point]) -> list[str]:
    diffs = compare(brackets)
    lines = ["## Differences against noise", "",
             f"Each method's best point against the best one at the same budget: difference of mean perplexities, "
             f"its standard error se = sqrt(s1²/n1 + s2²/n2), and beyond noise when the difference exceeds "
             f"{NOISE_SIGMAS:g} se.", ""]
    if not diffs:
        return lines + ["Fewer than two methods have a finished point at any budget.", ""]
    rows = [[flops_text(d.budget), d.method, d.leader, f"+{d.diff:.3f}", "" if d.se is None else f"{d.se:.3f}",
             d.verdict] for d in diffs]
    lines += _table(["budget", "method", "vs best", "Δ val ppl", "se", "verdict"], rows, "lllrrl")
    lines.append("")
    for budget in dict.fromkeys(d.budget for d in diffs):
        mine = [d for d in diffs if d.budget == budget]
        beyond = [d.method for d in mine if d.verdict.startswith("beyond")]
        within = [d.method for d in mine if not d.verdict.startswith("beyond")]
        text = f"At {flops_text(budget)} FLOPs {mine[0].leader} is best; "
        text += f"ahead beyond noise of {', '.join(beyond)}" if beyond else "ahead of no method beyond noise"
        text += f"; not separated from {', '.join(within)} (within noise or one seed)." if within else "."
        lines.append(f"- {text}")
    lines += _peer_statement(brackets, points)
    return lines + [""]


def _peer_statement(brackets: Sequence[Bracket], points: Sequence[Point]) -> list[str]:
    """PEER against the best baseline per budget, and whether a third seed is due (|diff| < 2 se)."""
    lines = []
    ffn = {p.method: p.run.ffn for p in points}
    for budget in dict.fromkeys(b.budget for b in brackets):
        mine = [b for b in brackets if b.budget == budget and b.best is not None]
        peer = [b for b in mine if ffn[b.method] == "peer"]
        base = [b for b in mine if ffn[b.method] != "peer"]
        if len(peer) != 1 or not base:
            continue
        best_base = min(base, key=lambda b: b.best.ppl.mean)
        diff, se = difference(peer[0].best.ppl, best_base.best.ppl)
        where = (f"- At {flops_text(budget)} FLOPs, {peer[0].method} − {best_base.method} (best baseline) = "
                 f"{diff:+.3f}")
        if se is None:
            lines.append(f"{where}: no spread (run >= 2 seeds).")
        elif abs(diff) <= NOISE_SIGMAS * se:
            seeds = min(peer[0].best.ppl.n, best_base.best.ppl.n)
            advice = " Add a third seed (sweep.seeds)." if seeds < 3 else ""
            lines.append(f"{where} ± {se:.3f}: within {NOISE_SIGMAS:g} se.{advice}")
        else:
            lines.append(f"{where} ± {se:.3f}: beyond noise.")
    return lines


def _usage_section(points: Sequence[Point]) -> list[str]:
    lines = ["## Expert usage and unevenness (paper Table 2)", "",
             "Usage: fraction of the layer's experts (PEER) or value slots (PKM) retrieved at least once on the "
             "validation batches. Unevenness: KL(usage || uniform) of the accumulated gate mass, 0 = perfectly "
             "even. Sub-key usage: share of the 2·sqrt(N) sub-keys that are part of a retrieved expert (usage "
             "is at most the square of it). Mean ± standard deviation over the point's seeds.", ""]
    rows = []
    for point in points:
        r = point.run
        done = [res for res in point.results if res.done]
        if r.ffn not in ("peer", "pkm") or not done:
            continue
        for layer in done[0].experts:
            usage = Stat.of([res.experts.get(layer, {}).get("expert_usage", math.nan) for res in done])
            kl = Stat.of([res.experts.get(layer, {}).get("unevenness_kl", math.nan) for res in done])
            subkeys = Stat.of([res.experts.get(layer, {}).get("subkey_usage", math.nan) for res in done])
            rows.append([flops_text(r.budget), r.method, r.size, layer, human(r.num_experts or 0),
                         str(r.slots_per_token), _percent(usage), _stat(kl), _percent(subkeys)])
    if not rows:
        return lines + ["No finished PEER or PKM runs yet.", ""]
    lines += _table(["budget", "method", "size", "layer", "N", "h·k", "expert usage", "unevenness KL",
                     "sub-key usage"], rows, "llllrrrrr")
    return lines + [""]


def _percent(value: Stat | None) -> str:
    if value is None:
        return ""
    spread = "" if value.std is None else f" ± {100 * value.std:.1f}"
    return f"{100 * value.mean:.1f}%{spread} (n={value.n})"


def plot_isoflop(results: Sequence[RunResult], path: Path, title: str, data: Sequence[str] = ()) -> None:
    """Paper Figure 1: validation perplexity vs total parameters (log x), a line per method, a panel per budget.

    With several seeds a point is their mean with an error bar of one standard deviation.
    Each curve's minimum is marked with a star: filled when it is bracketed (interior),
    hollow when it sits at an end of the sizes tried.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state (renders with Agg)

    points = aggregate(results)
    brackets = {(b.budget, b.method): b for b in bracketing(points)}
    budgets = list(dict.fromkeys(r.run.budget for r in results))
    methods = list(dict.fromkeys(r.run.method for r in results))
    fig = Figure(figsize=(5.0 * len(budgets), 4.2), layout="constrained")
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    markers = "osD^vP*Xh"
    for ax, budget in zip(axes, budgets):
        for i, method in enumerate(methods):
            curve = sorted(((p.run.params_total, p.ppl.mean, p.ppl.std or 0.0) for p in points
                            if p.ppl is not None and p.budget == budget and p.method == method))
            if not curve:
                continue
            xs, ys, errs = zip(*curve)
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker=markers[i % len(markers)], label=method,
                        color=f"C{i}", capsize=3)
            best = brackets[(budget, method)]
            if best.best is not None:
                ax.plot([best.best.run.params_total], [best.best.ppl.mean], marker="*", markersize=16,
                        color=f"C{i}", markerfacecolor=f"C{i}" if best.bracketed else "none", linestyle="none")
        ax.set_xscale("log")
        ax.set_xlabel("total parameters")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"{flops_text(budget)} FLOPs  (★ minimum: filled = bracketed)", fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a budget without a finished run has no line yet
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
