"""`peer-dist bench ep`: one PEER layer under expert parallelism, side by side at several EP sizes.

Part 1, dispatch (measured): for each EP size E, E fresh processes on gloo each hold
1/E of the expert tables and run forward + backward of the layer on their own
tokens through the all_to_all dispatch (E = 1: the plain layer, no dispatch).
Reported per E: median step time, tokens/s per rank and in total, all_to_all bytes
per token next to the lower bound 2 * D * (distinct destination ranks per token)
values, and the rows-received imbalance (max rank / mean).

Part 2, owner layout (counted): for the same retrieval, how evenly the
(token, owner rank) rows fall on the ranks with the ``contiguous`` and the
``permuted`` owner functions, for E = 2 .. 16 - from a trained run's PEER layer
(``--run``, its validation tokens) or from a freshly initialised one.

On a CPU machine with fewer cores than ranks the processes share cores: tokens/s
per rank then falls with E for reasons that are not communication. Read the bytes
and imbalance columns as the dispatch's properties, the time columns as this
machine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from peer_dist.errors import ConfigError
from peer_dist.model.expert_tables import OWNER_LAYOUTS, ExpertSharding
from peer_dist.model.peer import PEER


@dataclass(frozen=True)
class EPBenchSpec:
    experts: int
    heads: int
    topk: int
    d_model: int
    d_key: int
    tokens: int  # per rank
    steps: int
    threads: int
    layout: str
    seed: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep", default="1,2,4", help="EP sizes to measure, comma separated (default 1,2,4)")
    parser.add_argument("--experts", type=int, default=256 * 256, help="N, a perfect square (default 256^2)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-key", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step (default 1024)")
    parser.add_argument("--steps", type=int, default=5, help="timed fwd+bwd steps; median reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--layout", choices=OWNER_LAYOUTS, default="permuted", help="owner function for part 1")
    parser.add_argument("--run", default=None, help="a run folder: count part 2 on its trained PEER layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per EP size")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")


def run(args: argparse.Namespace) -> int:
    sizes = _parse_sizes(args.ep)
    spec = EPBenchSpec(args.experts, args.heads, args.topk, args.d_model, args.d_key, args.tokens, args.steps,
                       args.threads, args.layout, args.seed)
    for e in sizes:
        if spec.experts % e:
            raise ConfigError(f"--experts {spec.experts} is not divisible by EP size {e}")
    with torch.device("meta"):
        PEER(spec.d_model, spec.experts, spec.heads, spec.topk, spec.d_key)  # argument checks only
    from peer_dist.parallel.spawn import run_ranks

    dispatch = []
    for e in sizes:
        ranks = run_ranks(_ep_worker, e, spec, timeout=args.timeout)
        dispatch.append(_summarise(e, spec, ranks))
    ids_TJ, num_experts = _retrieval_ids(args.run, spec)
    layouts = owner_imbalance(ids_TJ, num_experts, [2, 4, 8, 16])
    results = {"config": asdict(spec), "dispatch": dispatch, "owner_layouts": layouts,
               "retrieval": "trained run " + args.run if args.run else "fresh initialisation"}
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--ep {text!r}: give EP sizes as integers, e.g. 1,2,4") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--ep {text!r}: EP sizes must be >= 1")
    return sizes


# ---------------------------------------------------------------------------- part 1: dispatch


def _ep_worker(rank: int, world: int, spec: EPBenchSpec) -> dict[str, Any]:
    import torch.distributed as dist

    from peer_dist.parallel.expert_parallel import make_parallel_experts
    from peer_dist.parallel.layout import ParallelLayout

    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)  # same retrieval weights on every rank; tables by global id
    sharding = ExpertSharding(spec.experts, world, rank, spec.layout)
    layer = PEER(spec.d_model, spec.experts, spec.heads, spec.topk, spec.d_key, sharding=sharding)
    wrapper = None
    if world > 1:
        wrapper = make_parallel_experts(layer.experts, ParallelLayout(world, ep=world), rank)
        wrapper.ep_group = dist.group.WORLD  # what DeepSpeed's set_deepspeed_parallelism hands over
        layer.experts = wrapper
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(spec.tokens, spec.d_model, generator=gen, requires_grad=True)
    grad_y = torch.randn(spec.tokens, spec.d_model, generator=gen)
    times = []
    for step in range(spec.steps + 1):  # step 0 warms up allocator and thread pools
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad_y)
        if step:
            times.append(time.perf_counter() - start)
        if step == 0 and wrapper is not None:
            wrapper.stats.reset()
    stats = {} if wrapper is None else {k: getattr(wrapper.stats, k) for k in
                                        ("tokens", "pairs_sent", "bytes_sent", "bound_bytes", "rows_received")}
    return {"times": times, "stats": stats}


def _summarise(ep: int, spec: EPBenchSpec, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    # A step ends when the slowest rank is done: per step, the max over ranks.
    step_s = statistics.median(max(r["times"][i] for r in ranks) for i in range(spec.steps))
    row = {"ep": ep, "step_ms": step_s * 1e3, "tokens_per_s_per_rank": spec.tokens / step_s,
           "tokens_per_s_total": ep * spec.tokens / step_s}
    if ep > 1:
        total = {k: sum(r["stats"][k] for r in ranks) for k in ranks[0]["stats"]}
        received = [r["stats"]["rows_received"] for r in ranks]
        row.update(bytes_per_token=total["bytes_sent"] / total["tokens"],
                   bound_bytes_per_token=total["bound_bytes"] / total["tokens"],
                   destinations_per_token=total["pairs_sent"] / total["tokens"],
                   recv_imbalance=max(received) / (sum(received) / ep))
    return row


# ---------------------------------------------------------------------------- part 2: owner layouts


def _retrieval_ids(run_dir: str | None, spec: EPBenchSpec) -> tuple[torch.Tensor, int]:
    """(T, J) expert ids of one PEER layer and its N: a trained run's (validation tokens) or a fresh layer's."""
    if run_dir is None:
        torch.manual_seed(spec.seed)
        layer = PEER(spec.d_model, spec.experts, spec.heads, spec.topk, spec.d_key)
        x = torch.randn(4 * spec.tokens, spec.d_model, generator=torch.Generator().manual_seed(spec.seed))
        with torch.no_grad():
            return layer.retrieve(x)[1].reshape(x.shape[0], -1), spec.experts
    return _trained_ids(run_dir)


def _trained_ids(run_dir: str) -> tuple[torch.Tensor, int]:
    import tomllib

    from peer_dist.checkpoint.store import load_module_state, resolve_checkpoint
    from peer_dist.config import from_dict
    from peer_dist.data import Manifest, val_batches
    from peer_dist.model import build_model

    ckpt = resolve_checkpoint(run_dir)
    cfg = from_dict(tomllib.loads((ckpt.path / "config.toml").read_text()))
    manifest = Manifest.load(cfg.data.path)
    model = build_model(cfg.model, cfg.model.vocab_size or manifest.vocab_size)
    model.load_state_dict(load_module_state(ckpt))
    model.eval()
    _, layer = model.peer_layers()[0]
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        for batch in val_batches(cfg.data.path, rank=0, world=1, batch_size=16, max_batches=8):
            model(batch[:, :-1])
    hook.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    with torch.no_grad():
        return layer.retrieve(x)[1].reshape(x.shape[0], -1), layer.num_experts


def owner_imbalance(ids_TJ: torch.Tensor, num_experts: int, sizes: list[int]) -> list[dict[str, Any]]:
    """Rows (token, owner) per rank, max / mean, for each owner layout and EP size."""
    rows = []
    for ep in sizes:
        if num_experts % ep:
            continue
        row: dict[str, Any] = {"ep": ep}
        for layout in OWNER_LAYOUTS:
            owners = ExpertSharding(num_experts, ep, 0, layout).owner(ids_TJ)
            hit = torch.zeros(ids_TJ.shape[0], ep, dtype=torch.bool).scatter_(1, owners, True)
            per_rank = hit.sum(0).double()
            row[layout] = float(per_rank.max() / per_rank.mean())
            row[f"{layout}_destinations"] = float(hit.sum(1).double().mean())
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- report


def format_report(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = [f"PEER layer fwd+bwd under expert parallelism: N={c['experts']} h={c['heads']} k={c['topk']} "
             f"d={c['d_model']} tokens/rank={c['tokens']} steps={c['steps']} threads/rank={c['threads']} "
             f"layout={c['layout']}",
             f"{'EP':>3} {'step ms':>9} {'tok/s/rank':>11} {'tok/s total':>12} {'bytes/tok':>10} "
             f"{'bound':>8} {'dest/tok':>9} {'recv max/mean':>14}"]
    for r in results["dispatch"]:
        comm = (f"{r['bytes_per_token']:>10.0f} {r['bound_bytes_per_token']:>8.0f} "
                f"{r['destinations_per_token']:>9.2f} {r['recv_imbalance']:>14.3f}") if r["ep"] > 1 else \
            f"{'-':>10} {'-':>8} {'-':>9} {'-':>14}"
        lines.append(f"{r['ep']:>3} {r['step_ms']:>9.1f} {r['tokens_per_s_per_rank']:>11.0f} "
                     f"{r['tokens_per_s_total']:>12.0f} {comm}")
    lines.append(f"owner layouts, rows received max/mean over ranks ({results['retrieval']}):")
    lines.append(f"{'EP':>3} {'contiguous':>11} {'permuted':>9}")
    for r in results["owner_layouts"]:
        lines.append(f"{r['ep']:>3} {r['contiguous']:>11.3f} {r['permuted']:>9.3f}")
    return "\n".join(lines)
