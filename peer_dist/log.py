"""One logger for the whole package, prefixed with the process rank.

Rank 0 logs at INFO by default; other ranks only log warnings and errors unless
``PEER_DIST_LOG_ALL_RANKS=1`` is set (useful when debugging a hang).
"""

from __future__ import annotations

import logging
import os
import sys

_LOGGER_NAME = "peer_dist"


def get_logger() -> logging.Logger:
    return logging.getLogger(_LOGGER_NAME)


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Configure the package logger once per process with a ``[rank N]`` prefix."""
    logger = get_logger()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    all_ranks = os.environ.get("PEER_DIST_LOG_ALL_RANKS", "0") == "1"
    logger.setLevel(level if rank == 0 or all_ranks else logging.WARNING)
    logger.propagate = False
    return logger
