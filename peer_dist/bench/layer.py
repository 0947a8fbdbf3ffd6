"""`peer-dist bench layer`: one PEER layer, forward + backward + optimizer update, against references.

Variants, measured side by side in one run, for every N of ``--experts``:
    ours        peer_dist.model.peer.PEER with row-sparse table gradients and the
                row-sparse AdamW of peer_dist.train.sparse_tables (the training default);
                on CUDA its expert compute is the fused Triton kernels
    ours_torch  the same with the unfused torch expert compute (kernel "fused" or
                "chunked"); measured only where ours runs the Triton kernels
    ours_dense  the same layer with dense (N, D) table gradients and torch AdamW over
                every row (train.expert_update = "dense")
    naive       the paper's Algorithm 1 the way public implementations write it: the
                same retrieval, then gather u and v into (T, h, k, D) tensors and
                einsum; dense gradients, torch AdamW
    dense       a dense FFW (D -> d_ff -> D, GELU) with the same active parameters per
                token as PEER's experts: d_ff = h * k; torch AdamW
The references (all but ours) run for N up to ``--reference-max-experts``: beyond it
their dense optimizer state alone would not fit next to ours on a small machine.

``--device cuda`` runs everything on the current GPU, ``--dtype bf16`` in bf16 (tables,
activations; the row-sparse update keeps fp32 master rows).

Time: one fresh subprocess per N holds all variants (separate copies of the same
initial parameters, same inputs), first asserts that ours and naive agree (outputs
and every gradient, before any update), then runs fwd + bwd + update round-robin
(robust to drift on a shared machine); median over repeats. On CUDA each step is
bracketed by device synchronisations.

Peak memory: one fresh subprocess per (N, variant) builds the layer, its optimizer
and inputs, runs one warm-up step on a few tokens (thread pools, BLAS buffers, and
the optimizer state, which like the tables is persistent), reads RSS, resets the
kernel's peak-RSS counter (/proc/self/clear_refs, Linux), runs ONE full step and
reports peak RSS minus that baseline: the step's working memory beyond the tables
and their optimizer state (dense gradients, gathered tensors, temporaries). Without
clear_refs it falls back to ru_maxrss, which also counts the build phase (reported).
On CUDA, the timing process itself reads it per variant: torch.cuda.max_memory_allocated
over one step after reset_peak_memory_stats, minus what was allocated before the step.

Row traffic: what Algorithm 1 makes a step move through memory in expert rows, the
same count for every PEER variant so that their bandwidths compare:
    4 * P * D * b          u and v rows of every (token, expert) pair, read in
                           forward and again in backward
  + U * 2 * D * (4 + 2 b)  per distinct expert and table: one fp32 gradient row
                           written, the row read and written by the update
with P = tokens * h * k pairs, U distinct experts, b bytes per table element. The
report prints it per token and as achieved bandwidth (row bytes / step time), also as
a fraction of the copy bandwidth measured in the same run on the same device.

Floor: every distinct expert a step retrieves has its u and v rows read once and
written once (the update); at the copy bandwidth measured in the same run (a
256 MiB tensor copy, read + write bytes) that takes
    U * 2 tables * 2 (read + write) * D * b bytes / bandwidth,
with U the distinct experts of the benchmark batch. The report prints ours / floor.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peer_dist import native
from peer_dist.errors import ConfigError
from peer_dist.model.expert_ops import DEFAULT_CHUNK_SIZE, fused_kernel_available, resolve_kernel
from peer_dist.model.peer import PEER
from peer_dist.train.sparse_tables import SparseTableAdamW, TableSpec

VARIANTS = ("ours", "ours_torch", "ours_dense", "naive", "dense")
REFERENCES = VARIANTS[1:]
PEER_VARIANTS = VARIANTS[:4]  # the dense FFW moves no expert rows
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Relative tolerance (of the largest element) of the ours-vs-naive check: different summation
# orders; in bf16 the naive path also rounds its gathered tensors and dense gradients to bf16.
AGREEMENT_RTOL = {"fp32": 1e-4, "bf16": 5e-2}
LR = 1e-3  # any positive rate: the update's cost does not depend on it


@dataclass(frozen=True)
class BenchSpec:
    """Everything a worker process needs for one N; travels as JSON."""

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
    references: bool = True  # also run ours_dense, naive and dense
    device: str = "cpu"
    dtype: str = "fp32"

    def variants(self) -> tuple[str, ...]:
        """The variants this spec measures (ours_torch only where ours runs the Triton kernels)."""
        chosen = VARIANTS if self.references else ("ours", "ours_torch")
        triton = resolve_kernel(self.kernel, torch.device(self.device)) == "triton"
        return tuple(v for v in chosen if v != "ours_torch" or triton)


class NaivePEER(nn.Module):
    """Algorithm 1 with materialised gathers, over the retrieval and tables of ``peer``.

    This is the reference we beat: u_THKD and v_THKD are (tokens, h, k, D), and
    their gradients are too. Its retrieval is ours (exact product keys over 50 candidates
    for k = 16, fewer than the k^2 public implementations rank) on torch.topk.
    """

    def __init__(self, peer: PEER) -> None:
        super().__init__()
        self.peer = peer

    def forward(self, x_TD: Tensor) -> Tensor:
        """(T, D) -> (T, D)."""
        with native.disabled():  # torch.topk, as public implementations retrieve
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


class _Trainable:
    """A variant: its module and its optimizer(s); :meth:`step` = zero grads, fwd, bwd, update."""

    def __init__(self, module: nn.Module, sparse_tables: bool) -> None:
        self.module = module
        self.tables = None
        if sparse_tables:
            peer = module
            self.tables = SparseTableAdamW([TableSpec(peer.expert_u), TableSpec(peer.expert_v)], lr=LR)
        params = [p for p in module.parameters() if p.requires_grad]
        self.adamw = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def step(self, x_TD: Tensor, grad_y_TD: Tensor) -> Tensor:
        self.adamw.zero_grad(set_to_none=True)
        x_TD.grad = None
        y_TD = self.module(x_TD)
        y_TD.backward(grad_y_TD)
        self.adamw.step()
        if self.tables is not None:
            self.tables.reduce()
            self.tables.step()
        return y_TD.detach()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `peer-dist bench layer`."""
    parser.add_argument("--experts", default=str(256 * 256),
                        help="N, a perfect square, or a comma-separated sweep (e.g. 65536,262144,1048576)")
    parser.add_argument("--heads", type=int, default=8, help="h (default 8)")
    parser.add_argument("--topk", type=int, default=16, help="k per head (default 16)")
    parser.add_argument("--d-model", type=int, default=512, help="D (default 512)")
    parser.add_argument("--d-key", type=int, default=128, help="query/key width (default 128)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (default 2048)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant; median reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernel", default="auto", help="PEER expert kernel: auto | triton | fused | chunked")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="pairs per chunk (chunked kernel)")
    parser.add_argument("--query-norm", default="batchnorm", help="batchnorm | layernorm | none")
    parser.add_argument("--reference-max-experts", type=int, default=512 * 512,
                        help="run ours_dense, naive and dense only up to this N (default 512^2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results dict here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the layers run")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="parameters and activations")


def run(args: argparse.Namespace) -> int:
    """Measure every N, print the tables and the sweep ratios. Exit 1 if ours != naive anywhere."""
    specs = _specs_from_args(args)
    bandwidth = measure_copy_bandwidth(device=torch.device(args.device))
    results = []
    for spec in specs:
        timing = _spawn_worker("timing", "all", spec)
        if spec.device == "cuda":  # the timing process read the device's peak per variant
            memory = timing["memory"]
        else:
            memory = {v: _spawn_worker("memory", v, spec) for v in spec.variants()}
        results.append(_summarise(spec, memory, timing, bandwidth))
        print(format_table(results[-1]), flush=True)
    sweep = sweep_ratios(results)
    if sweep:
        print(format_sweep(sweep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "sweep": sweep, "copy_gb_per_s": bandwidth, "device": device_name(args.device)},
                      f, indent=2)
    bad = [r["config"]["experts"] for r in results if not r["agreement"]["ok"]]
    if bad:
        print(f"error: ours and naive disagree at N = {bad}", file=sys.stderr)
        return 1
    return 0


def _specs_from_args(args: argparse.Namespace) -> list[BenchSpec]:
    for flag, value in (("--tokens", args.tokens), ("--repeats", args.repeats), ("--threads", args.threads)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    try:
        sizes = [int(n) for n in str(args.experts).split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"--experts must be integers separated by commas, got {args.experts!r}") from None
    if not sizes:
        raise ConfigError("--experts needs at least one N")
    base = BenchSpec(experts=sizes[0], heads=args.heads, topk=args.topk, d_model=args.d_model, d_key=args.d_key,
                     tokens=args.tokens, repeats=args.repeats, threads=args.threads, seed=args.seed,
                     kernel=args.kernel, chunk_size=args.chunk_size, query_norm=args.query_norm,
                     timeout_s=args.timeout, device=args.device, dtype=args.dtype)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here; use --device cpu")
    specs = [replace(base, experts=n, references=n <= args.reference_max_experts) for n in sizes]
    with torch.device("meta"):  # validates every PEER argument without allocating the tables
        for spec in specs:
            _make_peer(spec)
    return specs


def measure_copy_bandwidth(mib: int = 256, repeats: int = 5, device: torch.device = torch.device("cpu")) -> float:
    """Median copy bandwidth in GB/s, counting read + write bytes, of a ``mib`` MiB fp32 tensor on ``device``.

    On CUDA, 256 MiB is several times the L2 of current GPUs (60 MB on an H200): the copy
    measures device memory, not the cache.
    """
    src = torch.randn(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = _clock(device)
        dst.copy_(src)
        times.append(_clock(device) - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def _clock(device: torch.device) -> float:
    """Host time after all work queued on ``device`` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # NOTE: host sync: device work is asynchronous
    return time.perf_counter()


def device_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU's model name (Linux) or the platform's."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


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
    return PEER(spec.d_model, spec.experts, heads=spec.heads, topk=spec.topk, d_key=spec.d_key,
                query_norm=spec.query_norm, chunk_size=spec.chunk_size, kernel=spec.kernel)


def _torch_kernel() -> str:
    """The unfused torch expert path: ATen's fused gather-dot where this build has it."""
    return "fused" if fused_kernel_available() else "chunked"


def _build(spec: BenchSpec, variants: tuple[str, ...]) -> tuple[dict[str, nn.Module], Tensor, Tensor]:
    """The modules of ``variants`` (PEER ones: copies of the same initial layer), x (T, D), grad (T, D)."""
    torch.manual_seed(spec.seed)
    device, dtype = torch.device(spec.device), DTYPES[spec.dtype]
    # Initialised on the CPU (the same parameters on every device), then copied on the device.
    peer = _make_peer(spec).to(device, dtype)
    dense = DenseFFW(spec.d_model, spec.heads * spec.topk).to(device, dtype)
    x_TD = torch.randn(spec.tokens, spec.d_model).to(device, dtype).requires_grad_()
    grad_y_TD = torch.randn(spec.tokens, spec.d_model).to(device, dtype)

    def torch_path() -> PEER:
        layer = copy.deepcopy(peer)
        layer.kernel = layer.expert_tables.kernel = _torch_kernel()
        return layer

    makers = {"ours": lambda: peer, "ours_torch": torch_path, "ours_dense": lambda: copy.deepcopy(peer),
              "naive": lambda: NaivePEER(copy.deepcopy(peer)), "dense": lambda: dense}
    return {v: makers[v]() for v in variants}, x_TD, grad_y_TD


def _trainables(modules: dict[str, nn.Module]) -> dict[str, _Trainable]:
    return {v: _Trainable(m, sparse_tables=v in ("ours", "ours_torch")) for v, m in modules.items()}


def _measure_memory(variant: str, spec: BenchSpec) -> dict[str, Any]:
    modules, x_TD, grad_y_TD = _build(spec, (variant,))
    trainable = _trainables(modules)[variant]
    # Warm up on a few tokens: thread pools, BLAS buffers, first-call state and the optimizer
    # state are not the step's working memory. Few tokens keep the allocator from retaining
    # step-sized free blocks that the measured step could then reuse without raising RSS.
    few = min(16, spec.tokens)
    trainable.step(x_TD[:few].detach().requires_grad_(), grad_y_TD[:few])
    trainable.adamw.zero_grad(set_to_none=True)
    gc.collect()
    baseline_mb = _rss_mb()
    method = "VmHWM after clear_refs" if _reset_peak_rss() else "ru_maxrss (includes build phase)"
    trainable.step(x_TD, grad_y_TD)
    return {"variant": variant, "baseline_mb": baseline_mb, "peak_mb": _peak_rss_mb() - baseline_mb, "method": method}


def _measure_time(spec: BenchSpec) -> dict[str, Any]:
    variants = spec.variants()
    device = torch.device(spec.device)
    modules, x_TD, grad_y_TD = _build(spec, variants)
    agreement = _check_agreement(modules["ours"], modules["naive"], x_TD, grad_y_TD, AGREEMENT_RTOL[spec.dtype]) \
        if spec.references else {"ok": True, "max_rel_err": {}}
    with torch.no_grad():
        distinct = int(torch.unique(modules["ours"].retrieve(x_TD)[1]).numel())  # NOTE: host sync, once
    trainables = _trainables(modules)
    for t in trainables.values():  # warm-up: allocator, thread pools, kernel compiles, optimizer state
        t.step(x_TD, grad_y_TD)
    memory = {v: _device_step_memory(trainables[v], x_TD, grad_y_TD) for v in variants} \
        if device.type == "cuda" else {}
    times_ms: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(spec.repeats):
        order = variants[rep % len(variants):] + variants[: rep % len(variants)]
        for variant in order:
            start = _clock(device)
            trainables[variant].step(x_TD, grad_y_TD)
            times_ms[variant].append((_clock(device) - start) * 1e3)
    return {"times_ms": times_ms, "agreement": agreement, "distinct_experts": distinct, "memory": memory}


def _device_step_memory(trainable: _Trainable, x_TD: Tensor, grad_y_TD: Tensor) -> dict[str, Any]:
    """One step's CUDA working memory: peak allocated during the step minus allocated before it."""
    trainable.adamw.zero_grad(set_to_none=True)
    torch.cuda.synchronize()  # NOTE: host sync: the counters must see every queued free
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainable.step(x_TD, grad_y_TD)
    torch.cuda.synchronize()  # NOTE: host sync
    peak = torch.cuda.max_memory_allocated()
    return {"baseline_mb": baseline / 2**20, "peak_mb": (peak - baseline) / 2**20,
            "method": "torch.cuda.max_memory_allocated"}


def _check_agreement(ours: nn.Module, naive: nn.Module, x_TD: Tensor, grad_y_TD: Tensor,
                     rtol: float) -> dict[str, Any]:
    """Same initial parameters, same input: outputs and all gradients (dense, before any update) must match."""
    results = {}
    for name, model in (("ours", ours), ("naive", naive)):
        model.zero_grad(set_to_none=True)
        x_TD.grad = None
        y_TD = model(x_TD)
        y_TD.backward(grad_y_TD)
        peer = model if name == "ours" else model.peer
        grads = {n: p.grad.clone() for n, p in peer.named_parameters() if p.grad is not None}
        results[name] = {"y": y_TD.detach(), "x.grad": x_TD.grad.clone(), **grads}
        model.zero_grad(set_to_none=True)
    errors = {}
    for key, ref in results["naive"].items():
        ref = ref.float()
        scale = ref.abs().max().clamp_min(1e-12)
        errors[key] = float((results["ours"][key].float() - ref).abs().max() / scale)  # NOTE: host sync
    same_keys = set(results["ours"]) == set(results["naive"])
    return {"ok": same_keys and max(errors.values()) <= rtol, "max_rel_err": errors}


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


def _summarise(spec: BenchSpec, memory: dict[str, dict[str, Any]], timing: dict[str, Any],
               bandwidth_gb_s: float) -> dict[str, Any]:
    variants = {}
    for variant, times in timing["times_ms"].items():
        median_ms = statistics.median(times)
        variants[variant] = {"ms_per_1k_tokens": median_ms / spec.tokens * 1e3, "median_step_ms": median_ms,
                             "times_ms": times, "peak_mb": memory[variant]["peak_mb"]}
    elem_bytes = DTYPES[spec.dtype].itemsize
    distinct = timing["distinct_experts"]
    row_bytes = row_traffic_bytes(spec.tokens * spec.heads * spec.topk, distinct, spec.d_model, elem_bytes)
    for variant, row in variants.items():
        if variant in PEER_VARIANTS:
            gb_per_s = row_bytes / (row["median_step_ms"] / 1e3) / 1e9
            row.update(row_bytes_per_token=row_bytes / spec.tokens, row_gb_per_s=gb_per_s,
                       row_fraction_of_copy=gb_per_s / bandwidth_gb_s)
    ours = variants["ours"]
    ratios = {}
    for ref in REFERENCES:
        if ref in variants:
            ratios[f"{ref}_over_ours_time"] = variants[ref]["median_step_ms"] / ours["median_step_ms"]
            ratios[f"{ref}_over_ours_memory"] = variants[ref]["peak_mb"] / max(ours["peak_mb"], 1e-9)
    floor_bytes = distinct * 2 * 2 * spec.d_model * elem_bytes  # u and v rows, read once and written once
    floor_ms = floor_bytes / (bandwidth_gb_s * 1e9) * 1e3
    return {
        "config": asdict(spec), "variants": variants, "ratios": ratios, "agreement": timing["agreement"],
        "memory_method": memory["ours"]["method"], "distinct_experts": distinct,
        "floor": {"bytes": floor_bytes, "copy_gb_per_s": bandwidth_gb_s, "ms": floor_ms,
                  "ours_over_floor": ours["median_step_ms"] / floor_ms},
    }


def row_traffic_bytes(pairs: int, distinct: int, d_model: int, elem_bytes: int) -> int:
    """Expert-row bytes a fwd + bwd + update step moves (module doc, "Row traffic").

    4 * P * D * b: the u and v rows of every (token, expert) pair, read in forward and in
    backward; U * 2 * D * (4 + 2 b): per distinct expert and table, an fp32 gradient row
    written and the table row read and written by the update.
    """
    return 4 * pairs * d_model * elem_bytes + distinct * 2 * d_model * (4 + 2 * elem_bytes)


def sweep_ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    """Ours at the largest N over ours at the smallest: time per token and step working memory."""
    if len(results) < 2:
        return {}
    first, last = results[0], results[-1]
    return {"experts_from": first["config"]["experts"], "experts_to": last["config"]["experts"],
            "time_ratio": last["variants"]["ours"]["median_step_ms"] / first["variants"]["ours"]["median_step_ms"],
            "memory_ratio": last["variants"]["ours"]["peak_mb"] / max(first["variants"]["ours"]["peak_mb"], 1e-9)}


def format_table(results: dict[str, Any]) -> str:
    """The printed report of one N: one row per variant, then the ratios and the floor."""
    c = results["config"]
    n = c["experts"]
    lines = [
        f"PEER layer fwd+bwd+update: N={n} ({math.isqrt(n)}^2) h={c['heads']} k={c['topk']} d={c['d_model']} "
        f"d_key={c['d_key']} tokens={c['tokens']} repeats={c['repeats']} threads={c['threads']} "
        f"kernel={c['kernel']} query_norm={c['query_norm']} device={c['device']} dtype={c['dtype']}",
        f"{'variant':<11} {'ms/1k tok':>10} {'step ms':>9} {'peak MB':>9} {'row KB/tok':>10} {'row GB/s':>9} "
        f"{'of copy':>8}",
    ]
    for name, row in results["variants"].items():
        traffic = (f"{row['row_bytes_per_token'] / 1e3:>10.1f} {row['row_gb_per_s']:>9.2f} "
                   f"{row['row_fraction_of_copy']:>8.1%}") if "row_gb_per_s" in row else f"{'-':>10} {'-':>9} {'-':>8}"
        lines.append(f"{name:<11} {row['ms_per_1k_tokens']:>10.1f} {row['median_step_ms']:>9.1f} "
                     f"{row['peak_mb']:>9.1f} {traffic}")
    r = results["ratios"]
    parts = [f"{ref}/ours: time {r[f'{ref}_over_ours_time']:.2f}x, memory {r[f'{ref}_over_ours_memory']:.2f}x"
             for ref in REFERENCES if f"{ref}_over_ours_time" in r]
    if parts:
        lines.append("   ".join(parts))
        worst = max(results["agreement"]["max_rel_err"].values())
        ok = "OK" if results["agreement"]["ok"] else "MISMATCH"
        lines.append(f"ours vs naive (outputs + all grads, before updates): max rel err {worst:.1e} -> {ok}")
    else:
        lines.append("references skipped at this N (--reference-max-experts)")
    f = results["floor"]
    lines.append(f"floor: {results['distinct_experts']} distinct experts x 2 tables read + written once = "
                 f"{f['bytes'] / 2**20:.0f} MiB at {f['copy_gb_per_s']:.1f} GB/s copy -> {f['ms']:.1f} ms; "
                 f"ours/floor {f['ours_over_floor']:.2f}x")
    lines.append(f"row traffic: u, v rows of every (token, expert) pair read in forward and backward, plus per "
                 f"distinct expert an fp32 gradient row and the update's read + write; 'of copy' = row GB/s over "
                 f"the {f['copy_gb_per_s']:.1f} GB/s copy")
    if results["memory_method"].startswith("torch.cuda"):
        lines.append("peak memory = torch.cuda.max_memory_allocated during one step minus allocated before it "
                     "(tables and optimizer state excluded)")
    else:
        lines.append(f"peak memory = {results['memory_method']} minus RSS before the step (tables and optimizer "
                     "state excluded), one fresh process per variant")
    return "\n".join(lines)


def format_sweep(sweep: dict[str, float]) -> str:
    return (f"sweep: ours at N={sweep['experts_to']} vs N={sweep['experts_from']}: time per token "
            f"{sweep['time_ratio']:.2f}x, step working memory {sweep['memory_ratio']:.2f}x")
