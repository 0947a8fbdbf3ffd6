"""Where this process sits in the job, read explicitly from the launcher's environment.

Supported launchers: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), Slurm ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``), mpirun with MPICH/PMI (``PMI_RANK``/``PMI_SIZE``)
or Open MPI (``OMPI_COMM_WORLD_*``), and a plain single process. Rank and world are
passed explicitly to everything that needs them (data loader included) rather than
re-read from the environment in worker processes.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from peer_dist.errors import LaunchError

# (launcher, rank var, world var, local rank var)
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    launcher: str  # "single" | "torchrun" | "slurm" | "mpich" | "openmpi"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank, world size and local rank from the first launcher whose variables are set."""
    env = os.environ if environ is None else environ
    for launcher, rank_var, world_var, local_var in _LAUNCHERS:
        if rank_var in env and world_var in env:
            try:
                rank, world = int(env[rank_var]), int(env[world_var])
                local_rank = int(env.get(local_var, "0"))
            except ValueError:
                raise LaunchError(f"{launcher}: {rank_var}/{world_var}/{local_var} must be integers") from None
            if not 0 <= rank < world:
                raise LaunchError(f"{launcher}: {rank_var}={rank} is outside 0..{world - 1} ({world_var}={world})")
            return DistEnv(rank, world, local_rank, launcher)
    return DistEnv(0, 1, 0, "single")


def pick_device(requested: str, env: DistEnv) -> torch.device:
    """``auto`` takes CUDA when present (one GPU per local rank), else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LaunchError("train.device='cuda' but CUDA is not available here; use train.device=cpu or auto")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise LaunchError("train.backend='nccl' needs CUDA devices; on CPU use train.backend=gloo or auto")
    return requested


def init_distributed(env: DistEnv, backend: str, timeout_s: float = 600.0) -> None:
    """Create the default process group (also for one process, so collectives are uniform).

    The timeout bounds every collective: a stalled rank makes the job fail instead
    of hanging forever.
    """
    if dist.is_initialized():
        return
    # DeepSpeed reads these itself (it asserts LOCAL_RANK), whatever launched us.
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world), LOCAL_RANK=str(env.local_rank))
    if env.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise LaunchError(
            f"launched by {env.launcher} (world size {env.world}) but MASTER_ADDR/MASTER_PORT are not set; "
            "use torchrun, or export them in the launch script (see launch/ and slurm/)"
        )
    dist.init_process_group(
        backend=backend, rank=env.rank, world_size=env.world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    if dist.get_world_size() != env.world:
        raise LaunchError(
            f"the launcher reports world size {env.world} but the process group has {dist.get_world_size()}"
        )
    # DeepSpeed keeps its own handle on the process group; it reuses the one we made.
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
