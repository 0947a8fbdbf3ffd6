"""User-facing errors.

Anything a user can cause (a bad config key or value, missing or corrupt data, a
missing checkpoint, a wrong launcher set-up) raises :class:`UserError` with one
message that names what is wrong and what is allowed. The CLI prints the message
(no traceback; once per job and machine, see :func:`first_to_report`) and exits with
:data:`EXIT_USER_ERROR`.

A checkpoint that could not be written (a full disk, an I/O error, a rank whose write
failed) raises :class:`CheckpointSaveError`: not the user's doing, but also shown as one
line; the CLI exits with :data:`EXIT_SAVE_FAILED`, so a job never exits 0 (or 75,
"stopped with a checkpoint") when the checkpoint it promises is missing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_SAVE_FAILED = 74  # EX_IOERR in sysexits.h: an I/O error on some file


class UserError(Exception):
    """An error caused by user input; its message is shown as is."""


class ConfigError(UserError):
    """A bad configuration key or value."""


class DataError(UserError):
    """Missing, corrupt or inconsistent data (shards, manifest, tokenizer)."""


class CheckpointError(UserError):
    """A missing, incomplete or incompatible checkpoint."""


class LaunchError(UserError):
    """A launcher set-up that cannot work (world sizes, environment)."""


class CheckpointSaveError(Exception):
    """A checkpoint could not be written or committed; it stays uncommitted (the previous one is intact)."""


def first_to_report(message: str, environ: dict[str, str] | None = None) -> bool:
    """Whether this process is the first of its job on this machine to report ``message``.

    Under torchrun, srun or mpirun every rank meets the same bad config or missing data
    and raises the same error; the job should print it once. The ranks of a job on one
    machine share their parent (the torchrun agent, slurmstepd, the MPI proxy), so the
    first rank to create a marker named by (parent, message) prints and the others stay
    silent; a rank with a different message prints its own. One process: always True.
    """
    environ = os.environ if environ is None else environ
    sizes = [environ.get(name, "1") for name in ("WORLD_SIZE", "SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")]
    if all(size in ("", "1") for size in sizes):
        return True
    parent = os.getppid()
    folder = Path(tempfile.gettempdir()) / f"peer-dist-{os.getuid()}-reported"
    try:
        folder.mkdir(exist_ok=True)
        _forget_finished_jobs(folder)
        restart = environ.get("TORCHELASTIC_RESTART_COUNT", "")  # a torchrun restart reports again
        digest = hashlib.sha256(f"{restart}\n{message}".encode()).hexdigest()[:16]
        marker = folder / f"{parent}-{_start_time(parent)}-{digest}"
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # no usable temp folder: better twice than never
        return True
    return True


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (tells a reused pid from the original)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _forget_finished_jobs(folder: Path) -> None:
    for marker in folder.iterdir():
        pid, started, _ = (marker.name.split("-") + ["", ""])[:3]
        if not pid.isdigit() or _start_time(int(pid)) != started:
            marker.unlink(missing_ok=True)
