"""Where this process sits in the job, read explicitly from the launcher's environment.

Supported launchers: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), mpirun with
MPICH/PMI (``PMI_RANK``/``PMI_SIZE``) or Open MPI (``OMPI_COMM_WORLD_*``), Slurm ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``), and a plain single process. Rank and world are
passed explicitly to everything that needs them (data loader included) rather than
re-read from the environment in worker processes.

Under an MPI launcher, :func:`init_distributed` asks MPI itself (mpi4py, imported only
then) whether the launcher's world is real, and shares rank 0's ``MASTER_ADDR``/
``MASTER_PORT`` so ``mpirun -n 2 peer-dist train ...`` needs no exports. Launch
scripts: launch/torchrun_multinode.sh, launch/mpirun.sh, slurm/train.sbatch.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from peer_dist.errors import LaunchError

# (launcher, rank var, world var, local rank var), first match wins.
# MPI before Slurm: ranks that mpirun starts inside an sbatch allocation inherit the
# batch step's SLURM_PROCID=0 (or the per-node proxy's), so there the Slurm variables
# are wrong and the MPI ones right; `srun --mpi=pmi2` sets both, consistently.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)
_MPI_LAUNCHERS = ("mpich", "openmpi")
_joined_group = False  # set once this process has called init_process_group (see end_process)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    launcher: str  # "single" | "torchrun" | "mpich" | "openmpi" | "slurm"

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


def init_distributed(env: DistEnv, backend: str, timeout_s: float = 600.0, device: torch.device | None = None) -> None:
    """Create the default process group (also for one process, so collectives are uniform).

    The timeout bounds the rendezvous and every collective: a missing or stalled rank
    makes the job fail instead of hanging forever. Every check that can fail runs
    before anything is written, so a broken launch leaves the run folder untouched.
    """
    if dist.is_initialized():
        return
    # DeepSpeed reads these itself (it asserts LOCAL_RANK), whatever launched us.
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world), LOCAL_RANK=str(env.local_rank))
    if env.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    else:
        if env.launcher in _MPI_LAUNCHERS:
            _mpi_rendezvous(env)
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise LaunchError(
                f"launched by {env.launcher} (world size {env.world}) but MASTER_ADDR/MASTER_PORT are not set; "
                "use torchrun, export them in the launch script (see launch/ and slurm/), "
                "or under mpirun install mpi4py (pip install 'peer-dist[mpi]') to share them automatically"
            )
    addr = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    timeout = datetime.timedelta(seconds=timeout_s)
    global _joined_group
    _joined_group = True
    try:
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world, timeout=timeout,
                                store=_restart_safe_store(env, timeout))
    except (dist.DistStoreError, dist.DistNetworkError) as exc:  # the rendezvous at MASTER_ADDR:MASTER_PORT
        text = str(exc).strip()
        reason = text.splitlines()[0].rstrip(".") if text else type(exc).__name__  # first line: no C++ frames
        raise LaunchError(
            f"rank {env.rank} of {env.world} ({env.launcher}) could not form the process group at {addr} "
            f"within {timeout_s:g} s: {reason}. "
            f"Check that the launcher starts {env.world} processes and that all of them use the same "
            "MASTER_ADDR/MASTER_PORT, reachable from every node"
        ) from None
    if dist.get_world_size() != env.world:
        raise LaunchError(
            f"the launcher ({env.launcher}) reports world size {env.world} but the process group has "
            f"{dist.get_world_size()}; every process must see the same launcher variables"
        )
    # DeepSpeed keeps its own handle on the process group; it reuses the one we made. Without
    # CUDA, name its accelerator: otherwise every rank prints that it guessed one. On a CUDA
    # machine running on the CPU (``device`` cpu) too: DeepSpeed would move the model to its
    # accelerator's device.
    if not torch.cuda.is_available() or (device is not None and device.type == "cpu"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from peer_dist.parallel.deepspeed_private import skip_shm_comm_build

    skip_shm_comm_build()
    _hide_deepspeed_collective_deprecations()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _hide_deepspeed_collective_deprecations() -> None:
    """Silence torch's FutureWarning for the collectives DeepSpeed's ZeRO still calls.

    torch 2.13 deprecates ``all_gather_into_tensor`` and ``reduce_scatter_tensor``; ZeRO 1/2
    calls them every step and every rank printed the warning. Our own code uses neither,
    and a user cannot act on a dependency's deprecation.
    """
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning)


def end_process(code: int) -> None:
    """Leave a process that joined a process group: flush, then exit without C++ teardown.

    gloo and c10d objects still alive at interpreter shutdown can abort the process from a
    destructor ("terminate called without an active exception", SIGABRT) after all the work
    is done and written, which torchrun reports as a failed rank. Every file is closed by
    now (metrics, TensorBoard, checkpoints), so skipping the destructors loses nothing.
    Processes that never initialised torch.distributed return normally.
    """
    if not _joined_group:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def flag_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where small flag tensors for collectives of ``group`` live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def finish_distributed() -> None:
    """Orderly end of a job that succeeded: wait for every rank, then tear the process group down.

    A rank that exits while gloo still has the group open can abort in its C++ destructor
    ("terminate called without an active exception") and turn a good run into a failed one.
    Not called on errors: a barrier would then wait for ranks that are gone.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _restart_safe_store(env: DistEnv, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, a key prefix per restart attempt on torchrun's own store (None elsewhere).

    torchrun (--max-restarts) keeps its store across restarts, and the process group's
    keys do not name the attempt: a restarted rank could read the address a dead rank of
    the previous attempt published and fail with "Connection refused" (seen in 2 of 2
    restarts here). Everything under ``peer_dist/attempt_<TORCHELASTIC_RESTART_COUNT>/``
    cannot see the old keys.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=env.world,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"peer_dist/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def _mpi_rendezvous(env: DistEnv) -> None:
    """Under mpirun: check MPI's world against the launcher's, then share rank 0's address and port.

    mpi4py is imported here only (importing ``mpi4py.MPI`` calls ``MPI_Init``). Without it
    nothing is checked and MASTER_ADDR/MASTER_PORT must come from the environment.
    """
    comm = _mpi_comm_world()
    if comm is None:
        return
    _check_mpi_world(env, comm.Get_size(), comm.Get_rank(), _mpi_library())
    # Collective on every rank, unconditionally, so no rank can skip it: gather host names
    # (one host -> loopback), then rank 0's MASTER_ADDR/MASTER_PORT, its own or picked here.
    hosts = comm.allgather(socket.gethostname())
    chosen = None
    if env.rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else _routable_address())
        port = os.environ.get("MASTER_PORT") or str(free_port("" if addr != "127.0.0.1" else addr))
        chosen = (addr, port)
    addr, port = comm.bcast(chosen, root=0)
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", port)


def _check_mpi_world(env: DistEnv, mpi_size: int, mpi_rank: int, library: str) -> None:
    """Abort when MPI's COMM_WORLD is not the job the launcher variables describe."""
    rank_var, world_var = next((r, w) for name, r, w, _ in _LAUNCHERS if name == env.launcher)
    if mpi_size != env.world:
        raise LaunchError(
            f"{world_var}={env.world} says the job has {env.world} processes, but MPI's COMM_WORLD has "
            f"{mpi_size} ({library}): the processes did not join one MPI job. Launch with the mpirun/mpiexec "
            f"of the MPI library mpi4py was built with (launch/mpirun.sh), or under Slurm use "
            f"`srun --mpi=pmi2`, or plain `srun` without {rank_var}/{world_var} set (slurm/train.sbatch)"
        )
    if mpi_rank != env.rank:
        raise LaunchError(f"{rank_var}={env.rank} but this process is MPI rank {mpi_rank} ({library}); "
                          "the launcher variables do not belong to this MPI job")


def _mpi_comm_world() -> Any | None:
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _mpi_library() -> str:
    from mpi4py import MPI

    first_line = MPI.Get_library_version().strip().splitlines()[0]
    return re.sub(r"\s+", " ", first_line)


def _routable_address() -> str:
    """This host's address as other hosts reach it (multi-node mpirun without MASTER_ADDR).

    The hostname's address, unless that is loopback (Debian maps the hostname to
    127.0.1.1); then the source address of the default route (a UDP connect sends nothing).
    """
    name = socket.getfqdn()
    try:
        addr = socket.gethostbyname(name)
    except OSError:
        addr = ""
    if addr and not addr.startswith("127."):
        return addr
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))
            return sock.getsockname()[0]
    except OSError:
        return name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
