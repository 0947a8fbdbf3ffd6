"""Run a function on W gloo ranks in fresh local processes, with a hard timeout (benchmarks, tests)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import traceback
from typing import Any, Callable

from peer_dist.parallel.env import free_port


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, results: Any, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # reported to the parent, which fails the test with it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120) -> list[Any]:
    """``fn(rank, world, *args)`` on every rank; returns the results by rank or raises with the tracebacks."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, results, args)) for r in range(world)]
    for p in procs:
        p.start()
    collected: dict[int, tuple[str, Any]] = {}
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout)
            collected[rank] = (status, value)
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}:\n{v}" for r, (s, v) in sorted(collected.items()) if s == "error"]
    missing = sorted(set(range(world)) - set(collected))
    if errors or missing:
        raise AssertionError(f"ranks without a result (timeout {timeout}s): {missing}\n" + "\n".join(errors))
    return [collected[r][1] for r in range(world)]
