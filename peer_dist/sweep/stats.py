"""What a reviewer asks of an isoFLOP table: seeds aggregated, minima bracketed, differences against noise,
learning rates chosen on the tuning split.

Everything here works on finished runs' numbers (``RunResult``: a planned run and its
final validation); nothing reads files.

* :func:`aggregate`: the runs of one point (budget, method, size) over their seeds:
  mean and sample standard deviation (``n - 1``) of the validation perplexity, usage
  and unevenness.
* :func:`bracketing`: per (budget, method) curve, over its points ordered by total
  parameters, whether the lowest mean perplexity is interior (a point on each side),
  i.e. the compute-optimal size lies inside the sizes tried.
* :func:`compare`: per budget, every method's best point against the best of all. The
  noise of a difference of two means is ``se = sqrt(s1^2 / n1 + s2^2 / n2)``; a
  difference is *beyond noise* when ``|diff| > 2 se`` (both points need n >= 2).
* :func:`choose`: per method, the tuning grid point with the lowest mean tuning-split
  loss over its seeds (ties: the first in grid order), once every run of the method's
  grid has finished; whether a chosen value sits at an end of its list.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

NOISE_SIGMAS = 2.0  # a difference is beyond noise when |diff| > NOISE_SIGMAS * its standard error


@dataclass
class Stat:
    """Mean and sample standard deviation (None with one value) of n values."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def text(self, fmt: str = ".3f") -> str:
        """"5.175 ± 0.031 (n=2)"; one value: "5.175 (n=1)"."""
        spread = "" if self.std is None else f" ± {self.std:{fmt}}"
        return f"{self.mean:{fmt}}{spread} (n={self.n})"


@dataclass
class Point:
    """One (budget, method, size) of the sweep: its runs (one per seed) and their statistics when finished."""

    budget: float
    method: str
    size: str
    results: list[Any]  # RunResult of every seed, finished or not
    ppl: Stat | None = None  # over the finished runs
    usage: Stat | None = None
    unevenness: Stat | None = None

    @property
    def run(self) -> Any:
        """The first seed's planned run (size, parameters and steps are the same for every seed)."""
        return self.results[0].run

    @property
    def done(self) -> int:
        return sum(r.done for r in self.results)

    @property
    def complete(self) -> bool:
        return self.done == len(self.results)


def aggregate(results: Sequence[Any]) -> list[Point]:
    """The runs grouped by (budget, method, size) in plan order, with their seed statistics."""
    points: dict[tuple[float, str, str], Point] = {}
    for res in results:
        key = (res.run.budget, res.run.method, res.run.size)
        points.setdefault(key, Point(*key, results=[])).results.append(res)
    for point in points.values():
        done = [r for r in point.results if r.done]
        point.ppl = Stat.of([r.val_perplexity for r in done])
        point.usage = Stat.of([u for r in done if (u := r.mean_expert("expert_usage")) is not None])
        point.unevenness = Stat.of([u for r in done if (u := r.mean_expert("unevenness_kl")) is not None])
    return list(points.values())


@dataclass
class Bracket:
    budget: float
    method: str
    best: Point | None  # the point of lowest mean perplexity among those with a result
    bracketed: bool
    text: str


def bracketing(points: Sequence[Point]) -> list[Bracket]:
    """Per (budget, method), in plan order: is the curve's minimum interior? (module doc)."""
    curves: dict[tuple[float, str], list[Point]] = {}
    for point in points:
        curves.setdefault((point.budget, point.method), []).append(point)
    out = []
    for (budget, method), curve in curves.items():
        curve = sorted(curve, key=lambda p: p.run.params_total)
        measured = [p for p in curve if p.ppl is not None]
        if not measured:
            out.append(Bracket(budget, method, None, False, "no finished point yet"))
            continue
        best = min(measured, key=lambda p: p.ppl.mean)
        i = curve.index(best)
        missing = len(measured) < len(curve)
        if len(curve) < 3:
            text = f"minimum at {best.size}; {len(curve)} size(s) cannot bracket it (needs 3 or more)"
            bracketed = False
        elif i == 0:
            text = f"minimum at the smallest size {best.size}: not bracketed (add a smaller size)"
            bracketed = False
        elif i == len(curve) - 1:
            text = f"minimum at the largest size {best.size}: not bracketed (add a larger size)"
            bracketed = False
        else:
            left, right = curve[i - 1], curve[i + 1]
            bracketed = left.ppl is not None and right.ppl is not None
            text = (f"interior minimum at {best.size} (between {left.size} and {right.size})" if bracketed
                    else f"minimum at {best.size} so far; its neighbours have not finished")
        if missing and bracketed is False and "so far" not in text:
            text += f" ({len(curve) - len(measured)} point(s) not finished)"
        out.append(Bracket(budget, method, best, bracketed, text))
    return out


@dataclass
class Difference:
    budget: float
    method: str
    leader: str
    diff: float  # this method's best mean perplexity - the leader's (>= 0)
    se: float | None  # standard error of the difference; None when either point has one seed
    verdict: str

    @property
    def sigmas(self) -> float | None:
        return None if self.se is None or self.se == 0 else self.diff / self.se


def difference(a: Stat, b: Stat) -> tuple[float, float | None]:
    """mean(a) - mean(b) and its standard error sqrt(sa^2/na + sb^2/nb) (None without two seeds each)."""
    if a.std is None or b.std is None:
        return a.mean - b.mean, None
    return a.mean - b.mean, math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)


def compare(brackets: Sequence[Bracket]) -> list[Difference]:
    """Per budget: each method's best point against the best method's (module doc)."""
    out = []
    for budget in dict.fromkeys(b.budget for b in brackets):
        best = [b for b in brackets if b.budget == budget and b.best is not None]
        if len(best) < 2:
            continue
        leader = min(best, key=lambda b: b.best.ppl.mean)
        for b in best:
            if b is leader:
                continue
            diff, se = difference(b.best.ppl, leader.best.ppl)
            if se is None:
                verdict = "no spread: needs >= 2 seeds per point"
            elif diff > NOISE_SIGMAS * se:
                verdict = f"beyond noise ({diff / se:.1f} se)" if se > 0 else "beyond noise (no spread)"
            else:
                verdict = f"within noise ({diff / se:.1f} se <= {NOISE_SIGMAS:g}): add seeds" if se > 0 \
                    else "within noise"
            out.append(Difference(budget, b.method, leader.method, diff, se, verdict))
    return out


def close_points(results: Sequence[Any]) -> list[tuple[float, str, str]]:
    """(budget, method, size) of the points that need more seeds: per budget whose points have
    all finished, the best point of every method within NOISE_SIGMAS standard errors of the
    leader's, and the leader's own. ``results``: the runs of the base seeds only."""
    points = aggregate(results)
    out = []
    for budget in dict.fromkeys(p.budget for p in points):
        mine = [p for p in points if p.budget == budget]
        if not all(p.complete for p in mine):
            continue
        brackets = bracketing(mine)
        close = [d for d in compare(brackets) if d.se is not None and d.diff <= NOISE_SIGMAS * d.se]
        if not close:
            continue
        best = {b.method: b.best for b in brackets if b.best is not None}
        for method in dict.fromkeys([close[0].leader] + [d.method for d in close]):
            out.append((budget, method, best[method].size))
    return out


# ---------------------------------------------------------------------------- tuning


@dataclass
class Choice:
    """A method's tuning: its grid points' mean tuning-split losses and the chosen point."""

    method: str
    points: list[tuple[dict[str, float], Stat | None, int, int]]  # (settings, tune loss, runs done, runs)
    chosen: dict[str, float] | None = None  # None until every grid run of the method has finished
    edges: list[str] = field(default_factory=list)  # chosen values at an end of their list
    runs: int = 0
    flops: float = 0.0  # training FLOPs of the method's grid runs


def choose(tune_results: Sequence[Any]) -> dict[str, Choice]:
    """Per method, the grid point of lowest mean tuning loss (module doc); in plan order.

    ``tune_results``: RunResult of the tuning runs (their val_loss is the tuning split's:
    they ran with data.eval_split = "tune").
    """
    by_method: dict[str, dict[tuple[tuple[str, float], ...], list[Any]]] = {}
    for res in tune_results:
        key = tuple(sorted(res.run.settings.items()))
        by_method.setdefault(res.run.method, {}).setdefault(key, []).append(res)
    out = {}
    for method, grid in by_method.items():
        choice = Choice(method, [])
        for key, results in grid.items():
            done = [r for r in results if r.done]
            choice.points.append((dict(key), Stat.of([r.val_loss for r in done]), len(done), len(results)))
            choice.runs += len(results)
            choice.flops += sum(r.run.flops for r in results)
        if all(done == total for _, _, done, total in choice.points):
            best = min(choice.points, key=lambda p: p[1].mean)  # first of equal losses (min is stable)
            choice.chosen = best[0]
            for key, value in choice.chosen.items():
                values = sorted({p[0][key] for p in choice.points})
                if len(values) > 1 and value in (values[0], values[-1]):
                    end = "lowest" if value == values[0] else "highest"
                    choice.edges.append(f"{key} = {value:g} is the grid's {end} value (widen the grid)")
        out[method] = choice
    return out
