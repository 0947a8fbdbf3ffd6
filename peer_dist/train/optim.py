"""AdamW for the dense weights, with a switch that makes one step a no-op (bad steps).

The expert tables (PEER u/v, PKM values) have their own row-sparse optimizer by
default: see :mod:`peer_dist.train.sparse_tables`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW; with ``skip_next_step`` set, ``step`` changes nothing.

    ``skip_next_step``: set by the trainer for a bad step (guard.py); ``step`` then leaves
    parameters, moments and step counts as they are, also when DeepSpeed's ZeRO or bf16
    wrapper calls it on its flat partitions.
    """

    skip_next_step = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.skip_next_step:
            if closure is not None:
                with torch.enable_grad():
                    return closure()
            return None
        return super().step(closure)
