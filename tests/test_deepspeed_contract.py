"""Contract tests for the private DeepSpeed behaviour peer_dist relies on (deepspeed is pinned).

If a DeepSpeed upgrade changes any of these, expert gradients would silently be averaged
over the wrong ranks: these tests fail first, loudly. (Checkpoints do not use DeepSpeed's
format; their gather/scatter goes through its public safe_get/set_full_* API, exercised
by the resume tests.)
Each runs a real DeepSpeed engine on 4 gloo ranks (EP = 2, and TP = 2 x EP = 2).
"""

from __future__ import annotations

import pytest
import torch

from peer_dist.parallel.spawn import run_ranks

OVERRIDES = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
             "model.peer.num_experts=256", "model.peer.heads=2", "model.peer.topk=4", "model.peer.d_key=16",
             "train.micro_batch_size=2"]


def _engine(rank: int, world: int, tp: int, ep: int, zero: int, update: str = "dense"):  # noqa: ANN202
    from peer_dist.config import load_config
    from peer_dist.model import ExpertPlacement, build_model
    from peer_dist.parallel.expert_parallel import parallelize_experts
    from peer_dist.parallel.layout import ParallelLayout
    from peer_dist.train.engine import build_engine

    import deepspeed

    from peer_dist.parallel.deepspeed_private import skip_shm_comm_build

    skip_shm_comm_build()  # as the trainer does
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    cfg = load_config(None, [*OVERRIDES, f"parallel.tp={tp}", f"parallel.ep={ep}", f"train.zero_stage={zero}",
                             f"train.expert_update={update}"])
    layout = ParallelLayout(world, tp=tp, ep=ep)
    torch.manual_seed(0)
    model = build_model(cfg.model, 64, ExpertPlacement(ep, layout.ep_rank(rank)))
    parallelize_experts(model, layout, rank, row_sparse_tables=cfg.train.expert_update == "sparse")
    return build_engine(model, cfg, layout), layout


def _contract_worker(rank: int, world: int, tp: int) -> dict[str, object]:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.utils import is_model_parallel_parameter

    from peer_dist.parallel import deepspeed_private as ds

    engine, layout = _engine(rank, world, tp=tp, ep=2, zero=0)
    name = "ep_size_2"
    experts = [p for p in engine.module.parameters() if ds.is_expert_parameter(p)]
    dense = [p for p in engine.module.parameters() if not ds.is_expert_parameter(p)]
    ep_ranks, edp_ranks = ds.expert_group_ranks(name)
    out: dict[str, object] = {
        # 1. the shim is recognised as a native MoE layer
        "has_moe": engine.has_moe_layers, "num_experts": list(engine.num_experts),
        "expert_params": len(experts),
        # 2. DeepSpeed's own expert groups are the ones ParallelLayout describes
        "ep_group": ep_ranks, "edp_group": edp_ranks,
        "layout_ep": layout.ep_group(rank), "layout_edp": layout.edp_group(rank),
        # ... and the process groups handed out by name are those groups
        "ep_pg": dist.get_process_group_ranks(ds.expert_parallel_group(name)),
        "edp_pg": dist.get_process_group_ranks(ds.expert_data_parallel_group(name)),
        "dp_pg": dist.get_process_group_ranks(ds.data_parallel_group()),
        "tp_pg": dist.get_process_group_ranks(ds.tensor_parallel_group()) if tp > 1 else None,
        "layout_dp": layout.dp_group(rank), "layout_tp": layout.tp_group(rank),
        # 3. MoE optimizer groups hold exactly the expert params
        "moe_groups": sorted(len(g["params"]) for g in engine.optimizer.param_groups if g.get("moe")),
        "expert_model_parallel": all(is_model_parallel_parameter(p) for p in experts) if tp > 1 else None,
    }
    # 4. gradient reduction: expert grads summed over the expert-data-parallel group and divided by
    #    the dense data-parallel size; dense grads averaged over the data-parallel group.
    for p in engine.module.parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    engine.buffered_allreduce_fallback()
    out["expert_grad"] = float(experts[0].grad.flatten()[0])
    out["dense_grad"] = float(dense[0].grad.flatten()[0])
    out["deepspeed"] = deepspeed.__version__
    # 5. no JIT build of DeepSpeed's shared-memory op (its file lock outlives a killed process)
    out["shm_op"] = deepspeed.comm.comm.cdb.shm_comm_op is None
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [1, 2])
def test_deepspeed_moe_contract(tp: int) -> None:
    results = run_ranks(_contract_worker, 4, tp, timeout=240)
    dp = 4 // tp
    for rank, r in enumerate(results):
        assert r["deepspeed"] == "0.19.8"  # the version these private APIs were checked against
        assert r["shm_op"], "DeepSpeed built its shared-memory op"
        assert r["has_moe"] and r["num_experts"] == [2] and r["expert_params"] == 2, r
        assert sorted(r["ep_group"]) == sorted(r["layout_ep"]) and sorted(r["edp_group"]) == sorted(r["layout_edp"])
        assert sorted(r["ep_pg"]) == sorted(r["layout_ep"]) and sorted(r["edp_pg"]) == sorted(r["layout_edp"])
        assert sorted(r["dp_pg"]) == sorted(r["layout_dp"]) and len(r["dp_pg"]) == dp
        assert r["tp_pg"] is None or sorted(r["tp_pg"]) == sorted(r["layout_tp"])
        assert r["moe_groups"] == [2], r["moe_groups"]  # u and v, in one MoE group (no weight decay)
        assert r["expert_model_parallel"] in (None, True)
        edp = r["layout_edp"]
        assert r["expert_grad"] == pytest.approx(sum(q + 1 for q in edp) / dp)
        dense_group = [q for q in range(4) if q % tp == rank % tp]
        assert r["dense_grad"] == pytest.approx(sum(q + 1 for q in dense_group) / dp)


def _sparse_worker(rank: int, world: int, tp: int, zero: int) -> dict[str, object]:
    from peer_dist.model.expert_tables import init_rows_
    from peer_dist.parallel import deepspeed_private as ds
    from peer_dist.model.peer import PEER

    engine, layout = _engine(rank, world, tp=tp, ep=2, zero=zero, update="sparse")
    peer = next(m for m in engine.module.modules() if isinstance(m, PEER))
    tables = engine.table_optimizer
    in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    sharding = peer.expert_tables.sharding
    own_rows = torch.empty_like(peer.expert_u.detach())  # what this rank's shard must hold after the broadcast
    init_rows_(own_rows, sharding.global_ids(), sharding.num_experts, peer.init_seed, peer.d_model ** -0.5)
    name = "ep_size_2"
    return {
        "tables": len(tables.params), "requires_grad": any(p.requires_grad for p in tables.params),
        "in_optimizer": any(id(p) in in_optimizer for p in tables.params),
        "has_moe": engine.has_moe_layers,
        # DeepSpeed's initial broadcast stayed within the expert-data-parallel group
        "own_rows": bool(torch.equal(peer.expert_u.detach().float(), own_rows.float())),
        "edp_group": ds.expert_group_ranks(name)[1], "layout_edp": layout.edp_group(rank),
        "norm_hook": hasattr(engine.optimizer, "scaled_global_norm"),  # ZeRO 1/2 (bf16 at ZeRO 0: the trainer test)
        # ZeRO 1/2 keep the fp32 masters of the dense weights in partitions (checkpoints read them so)
        "partitioned": all(ds.has_partitioned_master(p) for p in engine.module.parameters() if p.requires_grad),
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,zero", [(1, 1), (2, 2)])
def test_row_sparse_tables_stay_out_of_deepspeed(tp: int, zero: int) -> None:
    for r in run_ranks(_sparse_worker, 4, tp, zero, timeout=240):
        assert r["tables"] == 2 and not r["requires_grad"] and not r["in_optimizer"], r
        assert not r["has_moe"]  # no MoE layer: ZeRO needs no (empty) MoE parameter group
        assert r["own_rows"], "DeepSpeed's broadcast overwrote an expert shard"
        assert sorted(r["edp_group"]) == sorted(r["layout_edp"])
        assert r["norm_hook"] and r["partitioned"]
