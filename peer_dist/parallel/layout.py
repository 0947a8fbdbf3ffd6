"""The parallel layout: which ranks form the tensor-, data-, expert- and expert-data-parallel groups.

World W = TP x DP. Ranks are laid out TP-innermost, as DeepSpeed AutoTP does:

    rank = dp_index * TP + tp_rank
    TP group of a rank:   the TP consecutive ranks with its dp_index
    DP group:             the W / TP ranks with its tp_rank (dense gradients are averaged here)
    EP group:             within one tp lane, E consecutive dp indices  [k*E, (k+1)*E)
    expert-DP (EDP):      every rank holding the same expert shard: same dp_index mod E, any lane

Example W = 8, TP = 2, EP = 2:   TP [0,1] [2,3] [4,5] [6,7];  DP [0,2,4,6] [1,3,5,7];
EP [0,2] [4,6] [1,3] [5,7];  EDP [0,4,1,5] [2,6,3,7].

With TP = 1 these are exactly the groups DeepSpeed's native MoE builds
(``deepspeed_private.ensure_expert_groups``, legacy ordering), and with TP > 1
its "TP-strided" ordering: :func:`check_deepspeed_groups` verifies that after
DeepSpeed created them, so a DeepSpeed upgrade that changes the layout fails
loudly instead of averaging the wrong gradients.

Everything here is rank arithmetic; nothing talks to other processes.
"""

from __future__ import annotations

from dataclasses import dataclass

from peer_dist.errors import LaunchError


@dataclass(frozen=True)
class ParallelLayout:
    world: int
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1:
            raise LaunchError(f"parallel.tp={self.tp} and parallel.ep={self.ep} must be >= 1")
        if self.world % self.tp:
            raise LaunchError(f"world size {self.world} is not divisible by parallel.tp={self.tp}: "
                              f"the data-parallel size must be world / tp; allowed tp: {_divisors(self.world)}")
        if self.dp % self.ep:
            raise LaunchError(f"parallel.ep={self.ep} does not divide the data-parallel size {self.dp} "
                              f"(world {self.world} / tp {self.tp}); allowed ep: {_divisors(self.dp)}")

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def edp(self) -> int:
        """Ranks holding the same expert shard."""
        return self.world // self.ep

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def dp_index(self, rank: int) -> int:
        return rank // self.tp

    def ep_rank(self, rank: int) -> int:
        """Position in the EP group = which expert shard this rank holds."""
        return self.dp_index(rank) % self.ep

    def tp_group(self, rank: int) -> list[int]:
        start = self.dp_index(rank) * self.tp
        return list(range(start, start + self.tp))

    def dp_group(self, rank: int) -> list[int]:
        return list(range(self.tp_rank(rank), self.world, self.tp))

    def ep_group(self, rank: int) -> list[int]:
        first = self.dp_index(rank) // self.ep * self.ep
        return [d * self.tp + self.tp_rank(rank) for d in range(first, first + self.ep)]

    def edp_group(self, rank: int) -> list[int]:
        """Ordered like DeepSpeed: lane by lane, then EP block by block."""
        shard = self.ep_rank(rank)
        return [d * self.tp + lane for lane in range(self.tp) for d in range(shard, self.dp, self.ep)]

    def describe(self) -> str:
        return f"world {self.world} = tp {self.tp} x dp {self.dp}; ep {self.ep} (each expert shard on {self.edp} ranks)"


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_deepspeed_groups(layout: ParallelLayout, rank: int, group_name: str) -> None:
    """Contract check: DeepSpeed's expert groups for ``group_name`` equal :class:`ParallelLayout`'s.

    Reads DeepSpeed's private group tables (pinned version, see pyproject.toml).
    """
    from peer_dist.parallel.deepspeed_private import expert_group_ranks

    found = dict(zip(("expert-parallel", "expert-data-parallel"), expert_group_ranks(group_name)))
    expected = {"expert-parallel": layout.ep_group(rank), "expert-data-parallel": layout.edp_group(rank)}
    for kind, ranks in expected.items():
        if sorted(found[kind]) != sorted(ranks):
            raise RuntimeError(
                f"DeepSpeed built the {kind} group {found[kind]} for rank {rank}, peer_dist expects {ranks} "
                f"({layout.describe()}); the installed DeepSpeed changed its private MoE group layout"
            )
