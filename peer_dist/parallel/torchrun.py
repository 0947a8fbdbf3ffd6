"""``peer-dist torchrun``: torchrun with the exit code of the job instead of a traceback.

torchrun exits 1 and prints its own traceback whenever a worker fails, whatever the
worker's exit code; scripts (and Slurm's requeue logic) then cannot tell a bad config
(2) from a stop on a signal (75) or a crash. This wrapper takes torchrun's arguments
unchanged, runs ``-m peer_dist.cli COMMAND ...`` as the workers, and exits with the
root-cause worker's code (128 + N for a worker killed by signal N, and for torchrun
itself stopped by signal N). A user error has been printed once by the workers; any
other failure gets one line naming the rank.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from peer_dist.errors import EXIT_USER_ERROR, LaunchError

EXIT_STOPPED = 75  # the trainer's "stopped on a signal, checkpoint written" code


def split_arguments(argv: Sequence[str], commands: Sequence[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the peer-dist command and its arguments): split at the first command name."""
    for i, word in enumerate(argv):
        if word in commands:
            return list(argv[:i]), list(argv[i:])
    raise LaunchError(f"peer-dist torchrun needs a command after torchrun's options, one of {', '.join(commands)}; "
                      "e.g. peer-dist torchrun --standalone --nproc-per-node 2 train --config configs/tiny.toml")


def launch(argv: Sequence[str], commands: Sequence[str]) -> int:
    """Run torchrun with ``argv`` (its options, then a peer-dist command); return the job's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    options, command = split_arguments(argv, commands)
    if "-m" in options or "--module" in options or "--no-python" in options:
        raise LaunchError("peer-dist torchrun runs peer_dist.cli itself: leave out -m/--module/--no-python")
    args = parse_args([*options, "-m", "peer_dist.cli", *command])
    # The agent logs one "closing signal" warning per surviving worker and an error per failed
    # one; the workers and the line below say what matters.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        if code not in (EXIT_USER_ERROR, EXIT_STOPPED):
            how = (f"was killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
                   else f"exited with {failure.exitcode}")
            print(f"peer-dist torchrun: rank {rank} {how} (first failure of {len(exc.failures)}); "
                  "its output is above", file=sys.stderr)
        return code
    except SignalException as exc:  # torchrun passed it to the workers and waited --shutdown-timeout for them
        print(f"peer-dist torchrun: stopped by {exc.sigval.name}; the workers got it too", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0
