"""The CUDA path (the `gpu` tier: `pytest -m gpu`; every test skips cleanly without CUDA).

What runs here and nowhere else: the layer on a GPU with every kernel in fp32 and bf16
against float64 on the CPU; training through the CLI on CUDA (device choice, the NCCL
process group, the guard's and the stop signal's NCCL all-reduces, the CUDA peak-memory
metric, CUDA RNG state in checkpoints, DeepSpeed bf16); checkpoints moving between CUDA
and CPU; EP = 2 over NCCL on a machine with two GPUs. launch/gpu_check.sh runs this tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peer_dist.model.expert_ops import ExpertRouting, expert_mix, resolve_kernel, triton_importable
from peer_dist.model.peer import PEER
from peer_dist.train.faults import EXIT_INJECTED_CRASH
from tests.helpers import final_weights, read_metrics, run_cli, train_losses
from tests.references import layer_errors, reference_expert_mix, relative_error
from tests.test_train import TINY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KERNELS = ["auto", "triton", "fused", "chunked"]
# Relative errors (2-norm) against float64. fp32 on the GPU: different summation orders only.
# bf16: rounding of every input, weight and activation (~2^-9 each) through the whole layer.
FP32_BOUND, BF16_BOUND = 1e-4, 4e-2


def _kernel_available(kernel: str) -> None:
    if kernel == "triton" and not triton_importable():
        pytest.skip("triton is not installed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", KERNELS)
def test_layer_on_cuda_matches_float64(kernel: str, dtype: torch.dtype) -> None:
    _kernel_available(kernel)
    torch.manual_seed(0)
    cfg = dict(d_model=64, num_experts=256, heads=4, topk=8, d_key=16, query_norm="batchnorm", activation="gelu")
    model = PEER(**cfg, kernel=kernel).to("cuda", dtype)
    errors = layer_errors(model, cfg, torch.randn(4, 32, 64), same_ids=dtype == torch.bfloat16)
    assert max(errors.values()) < (FP32_BOUND if dtype == torch.float32 else BF16_BOUND), errors


def test_auto_runs_the_triton_kernels_on_cuda() -> None:
    if not triton_importable():
        pytest.skip("triton is not installed")
    assert resolve_kernel("auto", torch.device("cuda")) == "triton"
    import sys

    routing = ExpertRouting.build(torch.randint(0, 32, (8, 4), device="cuda"), 32)
    x, table = torch.randn(8, 16, device="cuda"), torch.randn(32, 16, device="cuda")
    expert_mix(x, torch.rand(32, device="cuda"), routing, table, table, "gelu", kernel="auto")
    assert "peer_dist.model.triton_kernels" in sys.modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_mix_at_paper_width(dtype: torch.dtype) -> None:
    """d_model 1024, h * k = 128 slots per token: the benchmark's row shape, many blocks per row."""
    _kernel_available("triton")
    gen = torch.Generator().manual_seed(1)
    tokens, slots, experts, d_model = 256, 128, 4096, 1024
    ids_TJ = torch.randint(0, experts, (tokens, slots), generator=gen)
    inputs = [torch.randn(tokens, d_model, generator=gen), torch.rand(tokens * slots, generator=gen) / slots,
              torch.randn(experts, d_model, generator=gen) * d_model**-0.5, torch.randn(experts, d_model, generator=gen)]
    inputs = [t.to(dtype) for t in inputs]
    leaves = [t.cuda().requires_grad_() for t in inputs]
    grad_y = torch.randn(tokens, d_model, generator=gen).to(dtype)
    routing = ExpertRouting.build(ids_TJ.cuda(), experts)
    y = expert_mix(*leaves[:2], routing, *leaves[2:], "gelu", kernel="triton")
    y.backward(grad_y.cuda())
    refs = [t.double().requires_grad_() for t in inputs]
    y_ref = reference_expert_mix(refs[0], refs[1], ids_TJ.reshape(-1), torch.arange(tokens).repeat_interleave(slots),
                                 refs[2], refs[3], "gelu")
    y_ref.backward(grad_y.double())
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_error(y, y_ref) < bound
    for got, ref in zip(leaves, refs):
        assert relative_error(got.grad, ref.grad) < bound


# ---- training through the CLI ----------------------------------------------------------------


def _train(tmp: Path, data: Path, name: str, *extra: str, nproc: int = 1) -> Path:
    run_cli(["train", *TINY, f"data.path={data}", f"run.dir={tmp}", f"run.name={name}", *extra], nproc=nproc,
            timeout=400)
    return tmp / name


@pytest.fixture(scope="module")
def cpu_fp32(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """The reference: 8 steps on the CPU in fp32, gloo."""
    return _train(tmp_path_factory.mktemp("cpu"), tiny_data, "cpu", "train.device=cpu", "train.max_steps=8",
                  "train.micro_batch_size=8")


@pytest.mark.timeout(600)
def test_bf16_training_on_cuda_tracks_cpu_fp32(tmp_path: Path, tiny_data: Path, cpu_fp32: Path) -> None:
    # NOTE: device "auto" on a CUDA machine: the NCCL backend, the Triton kernels, the guard's and
    # the stop flag's all-reduces on the GPU, CUDA peak memory in the metrics.
    run = _train(tmp_path, tiny_data, "cuda", "train.max_steps=8", "train.micro_batch_size=8",
                 "train.precision=bf16", "train.ckpt_interval=4")
    ref, got = train_losses(cpu_fp32), train_losses(run)
    assert len(got) == len(ref) == 8
    # Same data, same initial weights; bf16 activations and weights round at ~2^-9 per op.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=3e-2, atol=0)
    assert got[-1] < got[0]
    peaks = [row["sys/peak_memory_mb"] for row in read_metrics(run) if "sys/peak_memory_mb" in row]
    # torch.cuda.max_memory_allocated: the tiny model needs a few MiB, far below the process RSS
    assert peaks and 0 < peaks[-1] < 2048


@pytest.mark.timeout(900)
def test_checkpoint_moves_from_cuda_to_cpu_and_back(tmp_path: Path, tiny_data: Path, cpu_fp32: Path) -> None:
    # One 8-step run in three legs, the same command but the device: CUDA until a crash after
    # step 3 (checkpoint of step 2), CPU from there until a crash after step 7 (checkpoint of
    # step 6), CUDA again to the end. Each injected crash fires once per run folder.
    args = ["train", *TINY, f"data.path={tiny_data}", f"run.dir={tmp_path}", "run.name=moving",
            "train.max_steps=8", "train.micro_batch_size=8", "train.ckpt_interval=2",
            'faults.inject=["crash:step=3", "crash:step=7"]']
    for device, code in (("cuda", EXIT_INJECTED_CRASH), ("cpu", EXIT_INJECTED_CRASH), ("cuda", 0)):
        proc = run_cli([*args, f"train.device={device}"], timeout=400, check=False)
        assert proc.returncode == code, proc.stderr[-3000:]
    run = tmp_path / "moving"
    by_step = {row["step"]: row["train/loss"] for row in read_metrics(run) if "train/loss" in row}
    assert sorted(by_step) == list(range(1, 9))
    # fp32 on both devices: the same run up to summation order, amplified a little by Adam
    torch.testing.assert_close(torch.tensor([by_step[s] for s in range(1, 9)]), torch.tensor(train_losses(cpu_fp32)),
                               rtol=1e-3, atol=0)
    ref_w, w = final_weights(cpu_fp32), final_weights(run)
    assert ref_w.keys() == w.keys()
    for key, ref_tensor in ref_w.items():
        assert relative_error(w[key], ref_tensor) < 1e-2, key


@pytest.mark.timeout(900)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="EP over NCCL needs two GPUs (one rank per GPU)")
def test_ep2_over_nccl_equals_one_process(tmp_path: Path, tiny_data: Path) -> None:
    one = _train(tmp_path, tiny_data, "one", "train.micro_batch_size=8", "train.zero_stage=1")
    two = _train(tmp_path, tiny_data, "ep2", "parallel.ep=2", "train.micro_batch_size=4", "train.zero_stage=1",
                 nproc=2)
    torch.testing.assert_close(torch.tensor(train_losses(two)), torch.tensor(train_losses(one)), rtol=1e-4, atol=0)
    ref_w, w = final_weights(one), final_weights(two)
    for key, ref_tensor in ref_w.items():
        assert relative_error(w[key], ref_tensor) < 1e-4, key
