"""Die with the launcher: a rank whose torchrun agent is gone must not train on.

torchrun (torch 2.13) starts every worker in its own session (``setsid``), so a
``kill -9`` of the launcher's process group, or of the agent alone, leaves the ranks
running: they keep training and committing checkpoints into a run folder that the next
job (a restart, a requeue) is about to use. :func:`die_with_launcher` asks the kernel to
SIGKILL this process when its parent (the agent) exits (Linux ``PR_SET_PDEATHSIG``):
nothing more is written, and the last committed checkpoint stays intact (commits are a
rename). Only under torchrun: under srun or mpirun the parent is the scheduler's own
step daemon or proxy, which kills its tasks itself, and a plain process must survive
the shell that started it (nohup).

The parent is remembered when this module is imported (the CLI imports it first, before
torch), so a launcher that died while the rank was still starting is noticed too.

This module must not import torch.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

PARENT_AT_START = os.getppid()
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def under_torchrun_agent(environ: Mapping[str, str] | None = None) -> bool:
    """Whether torchrun's elastic agent started this process (it sets TORCHELASTIC_RUN_ID)."""
    env = os.environ if environ is None else environ
    return bool(env.get("TORCHELASTIC_RUN_ID"))


def die_with_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """Under torchrun on Linux: SIGKILL this process when its launcher exits; whether armed."""
    if not (under_torchrun_agent(environ) and sys.platform.startswith("linux")):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() != PARENT_AT_START:  # the launcher died before the request: we are an orphan already
        os.kill(os.getpid(), signal.SIGKILL)
    return True
