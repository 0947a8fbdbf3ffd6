"""The expert tables of a PEER layer: all N rows, or this process's shard of them.

Shape suffixes: N experts, L rows held locally (N / ep_size), D d_model, T rows
(tokens), S slots (row, expert) grouped by row.

Sharding by global expert id across an expert-parallel (EP) group of size E:
rank r holds L = N / E rows. Which rank owns expert i is a fixed function:

- ``contiguous``: owner(i) = i // L, local row i % L.
- ``permuted``: a fixed multiplicative permutation of the ids first,
  pi(i) = (i * PERMUTE_MULTIPLIER) mod N (a bijection: the multiplier is a prime
  that does not divide N), then owner(i) = pi(i) // L, local row pi(i) % L.

Product-key ids are a * n + b, so contiguous blocks group experts by their first
sub-key a: a token whose top first-half sub-keys fall into one block sends all of
its slots to one rank. The permutation mixes both halves into the owner. Which is
better is measured by ``peer-dist bench ep`` (rows received per rank, max/mean);
``permuted`` is the default (figures: docs/parallelism.md).

Initialisation is a pure function of (seed, global id): rows are drawn in blocks of
INIT_BLOCK permuted positions from generators seeded with (seed, block), so a shard
holds exactly the values the full table would have in those rows, whatever the layout
and EP size, without ever allocating the full table; under the default layout a rank
draws only its own blocks. This module never imports torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peer_dist.errors import ConfigError
from peer_dist.model.expert_ops import DEFAULT_CHUNK_SIZE, ExpertBagSum, ExpertRouting, expert_mix, row_grad_of

OWNER_LAYOUTS = ("permuted", "contiguous")
PERMUTE_MULTIPLIER = 2_654_435_761  # prime (Knuth's multiplicative hash constant)
INIT_BLOCK = 4096  # ids per seeded init block


@dataclass(frozen=True)
class ExpertSharding:
    """Which rank of the EP group owns which global expert id (see module doc)."""

    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0
    layout: str = "permuted"

    def __post_init__(self) -> None:
        if self.layout not in OWNER_LAYOUTS:
            raise ConfigError(f"expert owner layout {self.layout!r} is not known; allowed: {', '.join(OWNER_LAYOUTS)}")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ConfigError(f"num_experts={self.num_experts} must be divisible by the expert-parallel size "
                              f"{self.ep_size}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ConfigError(f"ep_rank={self.ep_rank} is outside 0..{self.ep_size - 1}")
        if self.layout == "permuted" and self.num_experts % PERMUTE_MULTIPLIER == 0:
            raise ConfigError(f"num_experts={self.num_experts} is a multiple of {PERMUTE_MULTIPLIER}; "
                              "use layout 'contiguous'")

    @property
    def rows_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    def _position(self, ids: Tensor) -> Tensor:
        if self.layout == "contiguous" or self.ep_size == 1:
            return ids
        # (i * m) mod N in int64: with m reduced mod N first, i * m < N^2 fits for N < 2^31.
        return (ids * (PERMUTE_MULTIPLIER % self.num_experts)) % self.num_experts

    def owner(self, ids: Tensor) -> Tensor:
        """Rank (0..E-1) owning each global id, same shape."""
        return torch.div(self._position(ids), self.rows_per_rank, rounding_mode="floor")

    def local_row(self, ids: Tensor) -> Tensor:
        """Row of each global id inside its owner's shard, same shape."""
        return self._position(ids) % self.rows_per_rank

    def global_ids(self, rank: int | None = None) -> Tensor:
        """(L,) global ids held by ``rank`` (default: this rank), in local row order."""
        rank = self.ep_rank if rank is None else rank
        positions = torch.arange(rank * self.rows_per_rank, (rank + 1) * self.rows_per_rank, dtype=torch.int64)
        if self.layout == "contiguous" or self.ep_size == 1:
            return positions
        inverse = pow(PERMUTE_MULTIPLIER % self.num_experts, -1, self.num_experts)
        return (positions * inverse) % self.num_experts


def init_position(ids: Tensor, num_experts: int) -> Tensor:
    """The position whose initial values global expert ``ids`` get: the permuted position
    pi(i) of the module doc, whatever the layout (identity if the multiplier divides N)."""
    multiplier = PERMUTE_MULTIPLIER % num_experts
    return ids if multiplier == 0 else (ids * multiplier) % num_experts


def init_rows_(table_LD: Tensor, global_ids_L: Tensor, num_experts: int, seed: int, std: float) -> None:
    """Fill row l with the N(0, std^2) draw that global id global_ids[l] gets for ``seed``.

    Values are drawn by init position (:func:`init_position`) in blocks of INIT_BLOCK
    positions, each block whole from its own generator seeded with (seed, block): torch's
    CPU normal sampler orders its output differently for different sizes, so drawing only
    part of a block would give other numbers. A rank of the default ``permuted`` layout
    holds a contiguous range of positions, so it draws only its own blocks (plus at most
    the two it shares at the edges of its range): start-up is O(rows held), not O(N).
    """
    positions = init_position(global_ids_L, num_experts)
    order = torch.argsort(positions)
    sorted_pos = positions[order]
    blocks = torch.unique(torch.div(sorted_pos, INIT_BLOCK, rounding_mode="floor")).tolist()
    for block in blocks:
        start = block * INIT_BLOCK
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (1 << 63))
        values = torch.randn(min(INIT_BLOCK, num_experts - start), table_LD.shape[1], generator=gen)
        lo, hi = torch.searchsorted(sorted_pos, torch.tensor([start, start + INIT_BLOCK])).tolist()
        table_LD[order[lo:hi]] = (values[sorted_pos[lo:hi] - start] * std).to(table_LD.dtype)


class ExpertTables(nn.Module):
    """u and v tables (L, D) of the experts this process holds, and their local compute.

    With ``sharding.ep_size == 1`` it holds all N experts and ``forward`` computes
    the layer's expert mix for (T, D) tokens. With a larger EP size only the
    shard is allocated, and the expert-parallel dispatch (peer_dist.parallel)
    calls :meth:`compute` on the rows it received.
    """

    row_indexed = True  # a step touches few rows: the gradients can be row-sparse (peer_dist.train.sparse_tables)

    def __init__(self, sharding: ExpertSharding, d_model: int, activation: str, kernel: str = "auto",
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.sharding, self.activation, self.kernel, self.chunk_size = sharding, activation, kernel, chunk_size
        self.u = nn.Parameter(torch.empty(sharding.rows_per_rank, d_model))
        self.v = nn.Parameter(torch.empty(sharding.rows_per_rank, d_model))

    @torch.no_grad()
    def reset_parameters(self, seed: int, std_u: float, std_v: float) -> None:
        if self.u.is_meta:  # shape-only model (argument checks, FLOP counts): nothing to fill
            return
        ids, num_experts = self.sharding.global_ids(), self.sharding.num_experts
        init_rows_(self.u, ids, num_experts, seed, std_u)
        init_rows_(self.v, ids, num_experts, seed + 1, std_v)

    def forward(self, x_TD: Tensor, ids_TJ: Tensor, gates_TJ: Tensor) -> Tensor:
        """All experts local: y[t] = sum_j gates[t, j] * sigma(u_id . x[t]) * v_id, (T, D)."""
        if self.sharding.ep_size != 1:
            raise RuntimeError("these expert tables are a shard: run the layer through the expert-parallel "
                               "dispatch (peer_dist.parallel.parallelize_experts)")
        routing = ExpertRouting.build(ids_TJ, self.sharding.num_experts)
        return self.compute(x_TD, gates_TJ.reshape(-1), routing)

    def compute(self, x_TD: Tensor, gates_S: Tensor, routing: ExpertRouting) -> Tensor:
        """Expert mix over local rows: routing ids are local rows 0..L-1; (T, D)."""
        return expert_mix(x_TD, gates_S, routing, self.u, self.v, self.activation, self.kernel, self.chunk_size)

    def extra_repr(self) -> str:
        s = self.sharding
        return f"rows={s.rows_per_rank} of {s.num_experts}, ep_rank={s.ep_rank}/{s.ep_size}, layout={s.layout}"


class ValueTable(nn.Module):
    """The value rows (L, D) of a PKM layer this process holds, and their weighted read.

    A value read needs no input rows, only (slot, weight) pairs: ``needs_rows = False``
    tells the expert-parallel dispatch not to send hidden vectors to the owners.
    """

    needs_rows = False
    row_indexed = True  # see ExpertTables

    def __init__(self, sharding: ExpertSharding, d_model: int) -> None:
        super().__init__()
        self.sharding = sharding
        self.weight = nn.Parameter(torch.empty(sharding.rows_per_rank, d_model))

    @property
    def d_out(self) -> int:
        """Width of an output row (the inputs it is sent are zero-width)."""
        return self.weight.shape[1]

    @torch.no_grad()
    def reset_parameters(self, seed: int, std: float) -> None:
        if not self.weight.is_meta:
            init_rows_(self.weight, self.sharding.global_ids(), self.sharding.num_experts, seed, std)

    def forward(self, x_TD: Tensor, ids_TJ: Tensor, weights_TJ: Tensor) -> Tensor:
        """All rows local: y[t] = sum_j weights[t, j] * value[ids[t, j]], (T, D)."""
        if self.sharding.ep_size != 1:
            raise RuntimeError("this value table is a shard: run the layer through the expert-parallel dispatch")
        routing = ExpertRouting.build(ids_TJ, self.sharding.num_experts)
        return self.compute(x_TD, weights_TJ.reshape(-1), routing)

    def compute(self, rows_RD: Tensor, weights_S: Tensor, routing: ExpertRouting) -> Tensor:
        """Weighted sum of local rows per (token) row or received (token, source) pair, (R, D).

        The value table's gradient is row-sparse when the table carries a ``row_grad`` sink.
        """
        return ExpertBagSum.apply(weights_S.to(self.weight.dtype), self.weight, routing, "auto", DEFAULT_CHUNK_SIZE,
                                  row_grad_of(self.weight))

    def extra_repr(self) -> str:
        s = self.sharding
        return f"rows={s.rows_per_rank} of {s.num_experts}, ep_rank={s.ep_rank}/{s.ep_size}, layout={s.layout}"
