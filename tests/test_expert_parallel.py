"""Expert parallelism against single-process references.

- rank arithmetic (layout, expert ownership, shard initialisation) checked exhaustively;
- the all_to_all dispatch on 2 gloo ranks, float64, against the same layer with all experts
  local: outputs and every gradient, including a rank with no tokens and a rank that
  receives nothing;
- whole training runs through the CLI under torchrun: EP (and TP) x ZeRO stages give the
  losses and final weights of one process on the same global batch, for PEER and for the
  MoE baseline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from peer_dist.errors import ConfigError, LaunchError
from peer_dist.model.expert_tables import ExpertSharding, ExpertTables, ValueTable
from peer_dist.model.moe import MoEExperts
from peer_dist.parallel.layout import ParallelLayout
from peer_dist.parallel.spawn import run_ranks
from tests.helpers import assert_same_run, read_metrics, run_cli
from tests.test_train import TINY

# ---- rank arithmetic -----------------------------------------------------------------------


def test_layout_groups_match_the_documented_example() -> None:
    layout = ParallelLayout(8, tp=2, ep=2)
    assert (layout.dp, layout.edp) == (4, 4)
    assert [layout.tp_group(r) for r in (0, 3)] == [[0, 1], [2, 3]]
    assert [layout.dp_group(r) for r in (0, 1)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert {tuple(layout.ep_group(r)) for r in range(8)} == {(0, 2), (4, 6), (1, 3), (5, 7)}
    assert {tuple(sorted(layout.edp_group(r))) for r in range(8)} == {(0, 1, 4, 5), (2, 3, 6, 7)}
    # Every rank is in exactly the groups that list it, and EP groups hold every shard once.
    for r in range(8):
        for group in (layout.tp_group(r), layout.dp_group(r), layout.ep_group(r), layout.edp_group(r)):
            assert r in group
        assert sorted(layout.ep_rank(q) for q in layout.ep_group(r)) == [0, 1]
        assert {layout.ep_rank(q) for q in layout.edp_group(r)} == {layout.ep_rank(r)}


@pytest.mark.parametrize("world,tp,ep,needle", [(6, 4, 1, "not divisible by parallel.tp=4"),
                                                (6, 1, 4, "parallel.ep=4 does not divide the data-parallel size 6"),
                                                (8, 2, 3, "allowed ep: 1, 2, 4")])
def test_layout_errors_name_the_sizes(world: int, tp: int, ep: int, needle: str) -> None:
    with pytest.raises(LaunchError, match=needle):
        ParallelLayout(world, tp=tp, ep=ep)


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
@pytest.mark.parametrize("num_experts,ep", [(36, 1), (36, 2), (36, 3), (36, 6), (1024, 4), (65536, 8)])
def test_expert_ownership_is_a_bijection(layout: str, num_experts: int, ep: int) -> None:
    ids = torch.arange(num_experts)
    owners = ExpertSharding(num_experts, ep, 0, layout).owner(ids)
    rows = ExpertSharding(num_experts, ep, 0, layout).local_row(ids)
    assert torch.bincount(owners, minlength=ep).tolist() == [num_experts // ep] * ep
    held = torch.cat([ExpertSharding(num_experts, ep, r, layout).global_ids() for r in range(ep)])
    assert torch.equal(held.sort().values, ids)  # every id held exactly once
    for r in range(ep):
        mine = ExpertSharding(num_experts, ep, r, layout).global_ids()
        assert torch.all(owners[mine] == r)
        assert torch.equal(rows[mine], torch.arange(num_experts // ep))  # local row order = global_ids order


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_shards_initialise_to_the_rows_of_the_full_table(layout: str) -> None:
    num_experts, ep = 9000, 4  # several init blocks, the last one partial
    full = ExpertTables(ExpertSharding(9000 // 4 * 4), 5, "gelu")
    full.reset_parameters(seed=11, std_u=0.5, std_v=0.25)
    n = full.u.shape[0]
    for r in range(ep):
        shard = ExpertTables(ExpertSharding(n, ep, r, layout), 5, "gelu")
        shard.reset_parameters(seed=11, std_u=0.5, std_v=0.25)
        ids = shard.sharding.global_ids()
        assert torch.equal(shard.u, full.u[ids]) and torch.equal(shard.v, full.v[ids])
    assert full.u.std().item() == pytest.approx(0.5, rel=0.02)
    assert not torch.equal(full.u, full.v * 2)  # u and v use different seeds
    with pytest.raises(ConfigError, match="divisible"):
        ExpertSharding(num_experts + 1, ep)


@pytest.mark.parametrize("ep", [1, 4, 16])
def test_a_shard_draws_only_its_own_init_blocks(ep: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up is O(rows held): under the default layout a rank's rows are a contiguous range of
    init positions, so it draws its own blocks plus at most the two it shares at the edges."""
    from peer_dist.model import expert_tables

    num_experts, d = 128 * 128, 3
    drawn = []
    real_randn = torch.randn
    monkeypatch.setattr(expert_tables.torch, "randn", lambda *a, **k: drawn.append(a[0]) or real_randn(*a, **k))
    shard = ExpertTables(ExpertSharding(num_experts, ep, ep - 1, "permuted"), d, "gelu")
    shard.reset_parameters(seed=3, std_u=1.0, std_v=1.0)
    rows = num_experts // ep
    assert rows <= sum(drawn) / 2 <= rows + 2 * expert_tables.INIT_BLOCK  # u and v
    assert ep == 1 or sum(drawn) / 2 < num_experts


# ---- the dispatch on 2 ranks, float64 -------------------------------------------------------

N_EXPERTS, D, SLOTS = 16, 6, 3


def _scenario_ids(rank: int, scenario: str, gen: torch.Generator) -> torch.Tensor:
    """Global expert ids (T, SLOTS) for a rank; contiguous layout: rank 0 owns 0..7, rank 1 owns 8..15."""
    if scenario == "rank1_has_no_tokens":
        return torch.randint(0, 8, (5, SLOTS), generator=gen) if rank == 0 else torch.zeros(0, SLOTS, dtype=torch.long)
    if scenario == "rank0_receives_nothing":
        return torch.randint(8, 16, (5 if rank == 0 else 3, SLOTS), generator=gen)
    return torch.randint(0, N_EXPERTS, (7 + rank, SLOTS), generator=gen)


def _dispatch_worker(rank: int, world: int, scenario: str, kind: str, layout_name: str) -> dict[str, float]:
    """One EP layer vs the same experts all local; returns the worst relative errors."""
    from peer_dist.parallel.expert_parallel import make_parallel_experts

    def build(sharding: ExpertSharding) -> torch.nn.Module:
        if kind == "peer":
            tables = ExpertTables(sharding, D, "gelu").double()
            tables.reset_parameters(seed=5, std_u=0.7, std_v=0.3)
        elif kind == "pkm":
            tables = ValueTable(sharding, D).double()
            tables.reset_parameters(seed=5, std=0.5)
        else:
            tables = MoEExperts(sharding, D, 4, "swiglu").double()
            tables.reset_parameters(seed=5, std_in=0.7, std_out=0.3)
        return tables

    full = build(ExpertSharding(N_EXPERTS, 1, 0, layout_name))
    shard = build(ExpertSharding(N_EXPERTS, world, rank, layout_name))
    wrapper = make_parallel_experts(shard, ParallelLayout(world, ep=world), rank)
    wrapper.ep_group = dist.group.WORLD  # what DeepSpeed's set_deepspeed_parallelism would hand it
    gen = torch.Generator().manual_seed(100 + rank)
    ids = _scenario_ids(rank, scenario, gen)
    x = torch.randn(ids.shape[0], D, generator=gen, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(ids.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(ids.shape[0], D, generator=gen, dtype=torch.float64)

    y = wrapper(x, ids, gates)
    needs_x = kind != "pkm"  # a value read does not depend on the input rows
    got = torch.autograd.grad(y, [x, gates, *shard.parameters()], grad_y, allow_unused=not needs_x)
    ref_y = full(x, ids, gates)
    want = torch.autograd.grad(ref_y, [x, gates, *full.parameters()], grad_y, allow_unused=not needs_x)
    if not needs_x:
        got, want = (tuple(torch.zeros_like(x) if g is None else g for g in grads) for grads in (got, want))
    errors = {"y": _rel(y, ref_y), "x.grad": _rel(got[0], want[0]), "gates.grad": _rel(got[1], want[1])}
    held = shard.sharding.global_ids()
    for name, g_shard, g_full in zip([n for n, _ in shard.named_parameters()], got[2:], want[2:]):
        dist.all_reduce(g_full)  # the full-table gradient of the global batch
        errors[name] = _rel(g_shard, g_full[held])
    errors["rows_received"] = float(wrapper.stats.rows_received)
    return errors


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["peer", "moe", "pkm"])
@pytest.mark.parametrize("scenario,layout_name", [("random", "permuted"), ("random", "contiguous"),
                                                  ("rank1_has_no_tokens", "contiguous"),
                                                  ("rank0_receives_nothing", "contiguous")])
def test_dispatch_equals_all_local_experts(scenario: str, layout_name: str, kind: str) -> None:
    results = run_ranks(_dispatch_worker, 2, scenario, kind, layout_name)
    received = [int(errors.pop("rows_received")) for errors in results]
    for rank, errors in enumerate(results):
        assert max(errors.values()) < 1e-12, (rank, errors)
    expected = {"rank1_has_no_tokens": [5, 0], "rank0_receives_nothing": [0, 8]}.get(scenario)
    assert received == expected if expected else min(received) > 0


# ---- whole training runs: parallel == one process on the same global batch ---------------------

MOE = ["model.ffn=moe", "model.moe.num_experts=4", "model.moe.topk=2", "model.moe.d_expert=32"]
PKM = ["model.ffn=pkm", "model.pkm.num_values=256", "model.pkm.heads=2", "model.pkm.topk=4", "model.pkm.d_key=16"]


def _train(tmp: Path, data: Path, name: str, *extra: str, nproc: int = 1) -> Path:
    proc = run_cli(["train", *TINY, f"data.path={data}", f"run.dir={tmp}", f"run.name={name}", *extra],
                   nproc=nproc, timeout=280)
    # Clean output: no deprecation noise from the collectives (one per rank and call before).
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    return tmp / name


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Path]:
    """One process, micro-batch 8 = the global batch of every parallel run below."""
    tmp = tmp_path_factory.mktemp("refs")
    return {"peer": _train(tmp, tiny_data, "peer", "train.micro_batch_size=8"),
            "moe": _train(tmp, tiny_data, "moe", "train.micro_batch_size=8", *MOE),
            "pkm": _train(tmp, tiny_data, "pkm", "train.micro_batch_size=8", *PKM)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_ep2_equals_single_process(tmp_path: Path, tiny_data: Path, references: dict[str, Path],
                                   zero_stage: int) -> None:
    run = _train(tmp_path, tiny_data, f"ep2-z{zero_stage}", "parallel.ep=2", "train.micro_batch_size=4",
                 f"train.zero_stage={zero_stage}", nproc=2)
    assert_same_run(run, references["peer"])
    # One expert file per layer and EP rank (never one per expert), each holding half of each table
    # with the global ids of its rows.
    experts = sorted((run / "checkpoints").glob("step_*"))[-1] / "state" / "experts"
    files = sorted(p.name for p in experts.iterdir())
    assert files == ["blocks.1.ffn.experts.ep000.pt", "blocks.1.ffn.experts.ep001.pt"]
    shard = torch.load(experts / files[1], weights_only=False)
    assert set(shard) == {"u", "v"} and shard["u"]["param"].shape == (128, 32)
    assert set(shard["u"]["rows"].tolist()).isdisjoint(torch.load(experts / files[0], weights_only=False)["u"]["rows"].tolist())
    # Dispatch metrics: rows out + partials back reach the 2 * D * destinations bound; the
    # gates and integers are the rest. At most 2 destinations per token with EP = 2.
    row = [r for r in read_metrics(run) if "train/loss" in r][-1]
    dests = row["ep/blocks.1.ffn/destinations_per_token"]
    assert 1 <= dests <= 2
    assert row["ep/blocks.1.ffn/bound_bytes_per_token"] == pytest.approx(2 * 32 * 4 * dests)
    assert row["ep/blocks.1.ffn/bytes_per_token"] > row["ep/blocks.1.ffn/bound_bytes_per_token"]
    assert row["ep/blocks.1.ffn/recv_rows_imbalance"] >= 1


@pytest.mark.timeout(300)
def test_moe_ep2_equals_single_process(tmp_path: Path, tiny_data: Path, references: dict[str, Path]) -> None:
    run = _train(tmp_path, tiny_data, "moe-ep2", "parallel.ep=2", "train.micro_batch_size=4",
                 "train.zero_stage=1", *MOE, nproc=2)
    assert_same_run(run, references["moe"])
    row = [r for r in read_metrics(run) if "train/loss" in r][-1]
    assert row["moe/blocks.1.ffn/balance_loss"] >= 1 - 1e-6  # E * sum f P >= 1, equality when uniform


@pytest.mark.timeout(300)
def test_pkm_ep2_equals_single_process(tmp_path: Path, tiny_data: Path, references: dict[str, Path]) -> None:
    """PKM value rows sharded like PEER's experts; only gates travel to the owners."""
    run = _train(tmp_path, tiny_data, "pkm-ep2", "parallel.ep=2", "train.micro_batch_size=4", *PKM, nproc=2)
    assert_same_run(run, references["pkm"])
    row = [r for r in read_metrics(run) if "train/loss" in r][-1]
    dests = row["ep/blocks.1.ffn/destinations_per_token"]
    assert row["ep/blocks.1.ffn/bound_bytes_per_token"] == pytest.approx(32 * 4 * dests)  # partial rows back only


@pytest.mark.timeout(300)
def test_tp2_equals_single_process(tmp_path: Path, tiny_data: Path, references: dict[str, Path]) -> None:
    run = _train(tmp_path, tiny_data, "tp2", "parallel.tp=2", "train.micro_batch_size=8", nproc=2)
    assert_same_run(run, references["peer"])  # final weights: the TP shards were gathered into the checkpoint


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("extra", [
    ["parallel.ep=4", "train.zero_stage=0"],
    ["parallel.ep=2", "train.zero_stage=2"],  # expert shards on 2 ranks each: ZeRO partitions them
    ["parallel.ep=2", "parallel.tp=2", "train.zero_stage=1", "train.micro_batch_size=4"],
    ["parallel.ep=2", "parallel.expert_layout=contiguous", "train.zero_stage=1"],
], ids=["ep4-z0", "ep2-z2", "tp2-ep2-z1", "ep2-contiguous"])
def test_four_ranks_equal_single_process(tmp_path: Path, tiny_data: Path, references: dict[str, Path],
                                         extra: list[str]) -> None:
    micro = [] if any(e.startswith("train.micro_batch_size") for e in extra) else ["train.micro_batch_size=2"]
    run = _train(tmp_path, tiny_data, "run", *micro, *extra, nproc=4)
    assert_same_run(run, references["peer"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_moe_four_ranks_ep4_equals_single_process(tmp_path: Path, tiny_data: Path,
                                                  references: dict[str, Path]) -> None:
    run = _train(tmp_path, tiny_data, "moe-ep4", "parallel.ep=4", "train.micro_batch_size=2", *MOE, nproc=4)
    assert_same_run(run, references["moe"])


def test_layout_error_before_any_work(tmp_path: Path, tiny_data: Path) -> None:
    proc = run_cli(["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp_path}", "parallel.ep=4"], nproc=2,
                   check=False, timeout=120)
    assert proc.returncode != 0
    assert "parallel.ep=4 does not divide the data-parallel size 2" in proc.stderr
    assert not (tmp_path / "run").exists()


def _resume_matches_uninterrupted(tmp: Path, data: Path, extra: list[str], nproc: int) -> None:
    """Train 4 steps with a checkpoint at 2; drop the step-4 checkpoint, train again: same run."""
    common = ["train.ckpt_interval=2", *extra]
    full = _train(tmp, data, "full", *common, nproc=nproc)
    resumed = tmp / "resumed"
    _train(tmp, data, "resumed", *common, "train.max_steps=2", nproc=nproc)
    _train(tmp, data, "resumed", *common, nproc=nproc)  # resumes from step 2
    rows = [r for r in read_metrics(resumed) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([r["train/loss"] for r in rows]),
                               torch.tensor([r["train/loss"] for r in read_metrics(full) if "train/loss" in r]),
                               rtol=1e-6, atol=0)
    assert_same_run(resumed, full)


@pytest.mark.timeout(400)
def test_ep2_checkpoint_resumes_exactly(tmp_path: Path, tiny_data: Path) -> None:
    _resume_matches_uninterrupted(tmp_path, tiny_data, ["parallel.ep=2", "train.micro_batch_size=4",
                                                        "train.zero_stage=1"], nproc=2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tp2_ep2_checkpoint_resumes_exactly(tmp_path: Path, tiny_data: Path) -> None:
    _resume_matches_uninterrupted(tmp_path, tiny_data, ["parallel.ep=2", "parallel.tp=2", "train.micro_batch_size=4",
                                                        "train.zero_stage=0"], nproc=4)
