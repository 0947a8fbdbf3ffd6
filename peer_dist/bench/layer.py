"""`peer-dist bench layer`: one PEER layer, forward + backward, against two references.

Variants, measured side by side in one run:
    ours   peer_dist.model.peer.PEER (streams expert rows, never builds (T, h*k, D) tensors)
    naive  the paper's Algorithm 1 the way public implementations write it: the
           same retrieval, then gather u and v into (T, h, k, D) tensors and einsum
    dense  a dense FFW (D -> d_ff -> D, GELU) with the same active parameters per
           token as PEER's experts: d_ff = h * k

Time: one fresh subprocess holds all three variants on the same parameters and
inputs, first asserts that ours and naive agree (outputs and every gradient),
then runs the fwd+bwd steps round-robin (robust to drift on a shared machine);
median over repeats.

Peak memory: one fresh subprocess per variant builds the layer and inputs, warms
up on a few tokens (thread pools, BLAS buffers), reads RSS, resets the kernel's
peak-RSS counter (/proc/self/clear_refs, Linux), runs ONE full fwd+bwd and
reports peak RSS minus that baseline: the step's working memory, parameter
gradients included. Without clear_refs it falls back to ru_maxrss, which also
counts the build phase (reported as such).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model.expert_ops import DEFAULT_CHUNK_SIZE
from peer_dist.model.peer import PEER

VARIANTS = ("ours", "naive", "dense")
# Relative tolerance of the ours-vs-naive check (fp32, different summation orders).
AGREEMENT_RTOL = 1e-4


@dataclass(frozen=True)
class BenchSpec:
    """Everything a worker process needs; travels as JSON."""

    experts: int
    heads: int
    topk: int
    d_model: int
    d_key: int
    tokens: int
    repeats: int
    threads: int
    seed: int
    kernel: str
    chunk_size: int
    query_norm: str
    timeout_s: float


class NaivePEER(nn.Module):
    """Algorithm 1 with materialised gathers, sharing the retrieval and tables of ``peer``.

    This is the reference we beat: u_THKD and v_THKD are (tokens, h, k, D), and
    their gradients are too.
    """

    def __init__(self, peer: PEER) -> None:
        super().__init__()
        self.peer = peer

    def forward(self, x_TD: Tensor) -> Tensor:
        """(T, D) -> (T, D)."""
        scores_THK, ids_THK = self.peer.retrieve(x_TD)
        gates_THK = scores_THK.softmax(dim=-1)
        u_THKD = F.embedding(ids_THK, self.peer.expert_u)
        v_THKD = F.embedding(ids_THK, self.peer.expert_v)
        z_THK = torch.einsum("td,thkd->thk", x_TD, u_THKD)
        act_THK = F.gelu(z_THK) if self.peer.activation == "gelu" else F.relu(z_THK)
        return torch.einsum("thk,thkd->td", gates_THK * act_THK, v_THKD)


class DenseFFW(nn.Module):
    """Linear(D, d_ff) -> GELU -> Linear(d_ff, D)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x_TD: Tensor) -> Tensor:
        """(T, D) -> (T, D)."""
        return self.down(F.gelu(self.up(x_TD)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `peer-dist bench layer`."""
    parser.add_argument("--experts", type=int, default=256 * 256, help="N, a perfect square (default 256^2)")
    parser.add_argument("--heads", type=int, default=8, help="h (default 8)")
    parser.add_argument("--topk", type=int, default=16, help="k per head (default 16)")
    parser.add_argument("--d-model", type=int, default=512, help="D (default 512)")
    parser.add_argument("--d-key", type=int, default=128, help="query/key width (default 128)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per fwd+bwd (default 2048)")
    parser.add_argument("--repeats", type=int, default=7, help="timed fwd+bwd per variant; median reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernel", default="auto", help="PEER gather-dot kernel: auto | fused | chunked")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="pairs per chunk (chunked kernel)")
    parser.add_argument("--query-norm", default="batchnorm", help="batchnorm | layernorm | none")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results dict here")


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, optionally write JSON. Exit code 0, or 1 if ours != naive."""
    spec = _spec_from_args(args)
    memory = {variant: _spawn_worker("memory", variant, spec) for variant in VARIANTS}
    timing = _spawn_worker("timing", "all", spec)
    results = _summarise(spec, memory, timing)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not results["agreement"]["ok"]:
        print(f"error: ours and naive disagree: {results['agreement']}", file=sys.stderr)
        return 1
    return 0


def _spec_from_args(args: argparse.Namespace) -> BenchSpec:
    for flag, value in (("--tokens", args.tokens), ("--repeats", args.repeats), ("--threads", args.threads)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    spec = BenchSpec(
        experts=args.experts,
        heads=args.heads,
        topk=args.topk,
        d_model=args.d_model,
        d_key=args.d_key,
        tokens=args.tokens,
        repeats=args.repeats,
        threads=args.threads,
        seed=args.seed,
        kernel=args.kernel,
        chunk_size=args.chunk_size,
        query_norm=args.query_norm,
        timeout_s=args.timeout,
    )
    with torch.device("meta"):  # validates every PEER argument without allocating the tables
        _make_peer(spec)
    return spec


# ---- worker processes ----------------------------------------------------------------------

_WORKER_CODE = "import sys; from peer_dist.bench.layer import worker_main; sys.exit(worker_main(sys.argv[1:]))"


def _spawn_worker(mode: str, variant: str, spec: BenchSpec) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; return its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-c", _WORKER_CODE, mode, variant, json.dumps(asdict(spec)), out_path]
        proc = subprocess.run(cmd, timeout=spec.timeout_s, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"bench worker {mode}/{variant} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out_path) as f:
            return json.load(f)


def worker_main(argv: list[str]) -> int:
    """Entry point of a worker process: argv = [mode, variant, spec_json, out_path]."""
    mode, variant, spec_json, out_path = argv
    spec = BenchSpec(**json.loads(spec_json))
    torch.set_num_threads(spec.threads)
    result = _measure_memory(variant, spec) if mode == "memory" else _measure_time(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


def _make_peer(spec: BenchSpec) -> PEER:
    return PEER(
        spec.d_model,
        spec.experts,
        heads=spec.heads,
        topk=spec.topk,
        d_key=spec.d_key,
        query_norm=spec.query_norm,
        chunk_size=spec.chunk_size,
        kernel=spec.kernel,
    )


def _build(spec: BenchSpec) -> tuple[dict[str, nn.Module], Tensor, Tensor]:
    """All variants (ours and naive share parameters), input x (T, D) and output grad (T, D)."""
    torch.manual_seed(spec.seed)
    peer = _make_peer(spec)
    dense = DenseFFW(spec.d_model, spec.heads * spec.topk)
    x_TD = torch.randn(spec.tokens, spec.d_model).requires_grad_()
    grad_y_TD = torch.randn(spec.tokens, spec.d_model)
    return {"ours": peer, "naive": NaivePEER(peer), "dense": dense}, x_TD, grad_y_TD


def _step(model: nn.Module, x_TD: Tensor, grad_y_TD: Tensor) -> Tensor:
    """One fwd+bwd as in training (grads set to None first, like zero_grad())."""
    model.zero_grad(set_to_none=True)
    x_TD.grad = None
    y_TD = model(x_TD)
    y_TD.backward(grad_y_TD)
    return y_TD.detach()


def _measure_memory(variant: str, spec: BenchSpec) -> dict[str, Any]:
    models, x_TD, grad_y_TD = _build(spec)
    model = models[variant]
    del models
    # Warm up on a few tokens: thread pools, BLAS buffers and first-call state are
    # process overhead, not the layer's working memory. Few tokens keep the
    # allocator from retaining step-sized free blocks that the measured step
    # could then reuse without raising RSS.
    few = min(16, spec.tokens)
    _step(model, x_TD[:few].detach().requires_grad_(), grad_y_TD[:few])
    model.zero_grad(set_to_none=True)
    gc.collect()
    baseline_mb = _rss_mb()
    method = "VmHWM after clear_refs" if _reset_peak_rss() else "ru_maxrss (includes build phase)"
    _step(model, x_TD, grad_y_TD)
    return {"variant": variant, "baseline_mb": baseline_mb, "peak_mb": _peak_rss_mb() - baseline_mb, "method": method}


def _measure_time(spec: BenchSpec) -> dict[str, Any]:
    models, x_TD, grad_y_TD = _build(spec)
    agreement = _check_agreement(models["ours"], models["naive"], x_TD, grad_y_TD)
    for model in models.values():  # warm-up: allocator, thread pools, first-call dispatch
        _step(model, x_TD, grad_y_TD)
    times_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(spec.repeats):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for variant in order:
            start = time.perf_counter()
            _step(models[variant], x_TD, grad_y_TD)
            times_ms[variant].append((time.perf_counter() - start) * 1e3)
    return {"times_ms": times_ms, "agreement": agreement}


def _check_agreement(ours: nn.Module, naive: nn.Module, x_TD: Tensor, grad_y_TD: Tensor) -> dict[str, Any]:
    """Same parameters (naive wraps ours), same input: outputs and all gradients must match."""
    results = {}
    for name, model in (("ours", ours), ("naive", naive)):
        y_TD = _step(model, x_TD, grad_y_TD)
        grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
        results[name] = {"y": y_TD, "x.grad": x_TD.grad.clone(), **grads}
    errors = {}
    for key, ref in results["naive"].items():
        scale = ref.abs().max().clamp_min(1e-12)
        errors[key] = float((results["ours"][key] - ref).abs().max() / scale)
    same_keys = set(results["ours"]) == set(results["naive"])
    return {"ok": same_keys and max(errors.values()) <= AGREEMENT_RTOL, "max_rel_err": errors}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return _ru_maxrss_mb()


def _reset_peak_rss() -> bool:
    """Reset the peak-RSS counter (Linux >= 4.0). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _ru_maxrss_mb()


def _ru_maxrss_mb() -> float:
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


# ---- report --------------------------------------------------------------------------------


def _summarise(spec: BenchSpec, memory: dict[str, dict[str, Any]], timing: dict[str, Any]) -> dict[str, Any]:
    variants = {}
    for variant in VARIANTS:
        times = timing["times_ms"][variant]
        median_ms = statistics.median(times)
        variants[variant] = {
            "ms_per_1k_tokens": median_ms / spec.tokens * 1e3,
            "us_per_token": median_ms * 1e3 / spec.tokens,  # equals ms per 1k tokens
            "median_step_ms": median_ms,
            "times_ms": times,
            "peak_mb": memory[variant]["peak_mb"],
        }
    ours, naive, dense = (variants[v] for v in VARIANTS)
    ratios = {
        "naive_over_ours_time": naive["median_step_ms"] / ours["median_step_ms"],
        "naive_over_ours_memory": naive["peak_mb"] / max(ours["peak_mb"], 1e-9),
        "dense_over_ours_time": dense["median_step_ms"] / ours["median_step_ms"],
        "dense_over_ours_memory": dense["peak_mb"] / max(ours["peak_mb"], 1e-9),
    }
    return {
        "config": asdict(spec),
        "variants": variants,
        "ratios": ratios,
        "agreement": timing["agreement"],
        "memory_method": memory["ours"]["method"],
    }


def format_table(results: dict[str, Any]) -> str:
    """The printed report: one row per variant, then the ratios."""
    c = results["config"]
    lines = [
        f"PEER layer fwd+bwd: N={c['experts']} h={c['heads']} k={c['topk']} d={c['d_model']} "
        f"d_key={c['d_key']} tokens={c['tokens']} repeats={c['repeats']} threads={c['threads']} "
        f"kernel={c['kernel']} query_norm={c['query_norm']}",
        f"{'variant':<8} {'ms/1k tok':>10} {'us/token':>9} {'step ms':>9} {'peak MB':>9}",
    ]
    for name, row in results["variants"].items():
        lines.append(
            f"{name:<8} {row['ms_per_1k_tokens']:>10.1f} {row['us_per_token']:>9.1f} "
            f"{row['median_step_ms']:>9.1f} {row['peak_mb']:>9.1f}"
        )
    r = results["ratios"]
    lines.append(
        f"naive/ours: time {r['naive_over_ours_time']:.2f}x, memory {r['naive_over_ours_memory']:.2f}x   "
        f"dense/ours: time {r['dense_over_ours_time']:.2f}x, memory {r['dense_over_ours_memory']:.2f}x"
    )
    worst = max(results["agreement"]["max_rel_err"].values())
    lines.append(f"ours vs naive (outputs + all grads): max rel err {worst:.1e} -> {'OK' if results['agreement']['ok'] else 'MISMATCH'}")
    lines.append(f"peak memory = {results['memory_method']} minus RSS before the step, one fresh process per variant")
    return "\n".join(lines)
