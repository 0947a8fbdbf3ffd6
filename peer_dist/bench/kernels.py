"""`peer-dist bench kernels`: the C kernels of peer_dist.native against the torch path they replace.

Each kernel and its torch counterpart run on the same inputs in one process, alternating
over ``--repeats`` rounds; the medians and their ratio are printed, with the largest
difference between the two results (0 where the results must be identical).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from peer_dist import native
from peer_dist.errors import ConfigError
from peer_dist.model.expert_ops import ExpertRouting, gather_dot
from peer_dist.train.sparse_tables import SparseTableAdamW, TableSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `peer-dist bench kernels`."""
    parser.add_argument("--threads", type=int, default=1, help="torch (and native) threads (default 1)")
    parser.add_argument("--repeats", type=int, default=9, help="rounds per kernel (default 9)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the layer call (default 2048)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")


def run(args: argparse.Namespace) -> int:
    if args.threads < 1 or args.repeats < 1 or args.tokens < 1:
        raise ConfigError("--threads, --repeats and --tokens must be >= 1")
    if not native.topk_available(torch.zeros(1, 1)):
        raise ConfigError("the C kernels are not available here (no C compiler, or PEER_DIST_NATIVE=0)")
    torch.set_num_threads(args.threads)
    rows = [_measure(name, native_fn, torch_fn, args.repeats) for name, native_fn, torch_fn in _cases(args.tokens)]
    print(format_table(rows, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _cases(tokens: int) -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """(name, native call, torch call) at a PEER layer's shapes: h = 8, k = 16, N = 256^2 (the fused
    sub-key scores at N = 1024^2, d_key = 128, where the layer uses them)."""
    gen = torch.Generator().manual_seed(0)
    num_experts, pairs_per_token = 256 * 256, 8 * 16
    scores = torch.randn(tokens * 8, 32, generator=gen) @ torch.randn(32, 256, generator=gen)
    candidates = torch.randn(tokens * 8, 50, generator=gen)
    queries, keys_1024 = torch.randn(tokens * 8, 64, generator=gen), torch.randn(1024, 64, generator=gen)
    ids = torch.randint(0, num_experts, (tokens, pairs_per_token), generator=gen)
    routing = ExpertRouting.build(ids, num_experts)
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        (f"top-16 of 256 ({tokens * 8} rows)", lambda: native.topk(scores, 16), lambda: scores.topk(16)),
        (f"top-16 of 50 ({tokens * 8} rows)", lambda: native.topk(candidates, 16), lambda: candidates.topk(16)),
        (f"scores + top-16 of 1024 ({tokens * 8} rows)", lambda: native.scores_topk(queries, keys_1024, 16),
         lambda: (queries @ keys_1024.t()).topk(16)),
        (f"argsort of {ids.numel()} expert ids", lambda: native.argsort_ids(ids.reshape(-1), num_experts),
         lambda: torch.argsort(ids.reshape(-1), stable=True)),
    ]
    for width in (64, 512):
        x = torch.randn(tokens, width, generator=gen)
        table = torch.randn(num_experts, width, generator=gen)
        cases.append((f"gather-dot, d = {width}", lambda x=x, t=table: gather_dot(x, t, routing, "auto"),
                      lambda x=x, t=table: gather_dot(x, t, routing, "fused")))
        cases.append((f"row-sparse AdamW, d = {width}", *_adamw_pair(routing.experts_U, width, gen)))
    return cases


def _adamw_pair(ids_U: torch.Tensor, width: int, gen: torch.Generator) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The same update (rows ids_U of a (256^2, width) table) through the fused kernel and the torch path."""
    grad = torch.randn(ids_U.numel(), width, generator=gen)
    optimizers = []
    for _ in range(2):
        table = torch.nn.Parameter(torch.zeros(256 * 256, width))
        optimizers.append(SparseTableAdamW([TableSpec(table)], lr=1e-3))

    def step(opt: SparseTableAdamW) -> torch.Tensor:
        opt.tables[0].param.row_grad.add(ids_U, grad)  # type: ignore[attr-defined]
        opt.reduce()
        opt.step()
        return opt.tables[0].param

    def torch_step() -> torch.Tensor:
        with native.disabled():
            return step(optimizers[1])

    return (lambda: step(optimizers[0])), torch_step


def _measure(name: str, native_fn: Callable[[], Any], torch_fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"native": [], "torch": []}
    outputs: dict[str, Any] = {"native": native_fn(), "torch": torch_fn()}  # warm-up, and the results compared
    for _ in range(repeats):
        for kind, fn in (("native", native_fn), ("torch", torch_fn)):
            start = time.perf_counter()
            fn()
            times[kind].append(time.perf_counter() - start)
    native_ms, torch_ms = (statistics.median(times[k]) * 1e3 for k in ("native", "torch"))
    return {"kernel": name, "native_ms": native_ms, "torch_ms": torch_ms, "speedup": torch_ms / native_ms,
            "max_abs_diff": _max_diff(outputs["native"], outputs["torch"])}


def _max_diff(a: Any, b: Any) -> float:
    first = a[0] if isinstance(a, tuple) else a
    second = b[0] if isinstance(b, tuple) else b
    return float((first.detach().double() - second.detach().double()).abs().max()) if first.numel() else 0.0


def format_table(rows: list[dict[str, Any]], threads: int) -> str:
    lines = [f"C kernels vs torch, {threads} thread(s), medians", "",
             f"{'kernel':<36} {'torch ms':>9} {'native ms':>10} {'speedup':>8} {'max |diff|':>11}"]
    for r in rows:
        lines.append(f"{r['kernel']:<36} {r['torch_ms']:>9.2f} {r['native_ms']:>10.2f} {r['speedup']:>7.2f}x "
                     f"{r['max_abs_diff']:>11.2e}")
    return "\n".join(lines)
