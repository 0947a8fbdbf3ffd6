"""User-facing errors.

Anything a user can cause (a bad config key or value, missing or corrupt data, a
missing checkpoint, a wrong launcher set-up) raises :class:`UserError` with one
message that names what is wrong and what is allowed. The CLI prints the message
(no traceback) and exits with :data:`EXIT_USER_ERROR`.

A checkpoint that could not be written (a full disk, an I/O error, a rank whose write
failed) raises :class:`CheckpointSaveError`: not the user's doing, but also shown as one
line; the CLI exits with :data:`EXIT_SAVE_FAILED`, so a job never exits 0 (or 75,
"stopped with a checkpoint") when the checkpoint it promises is missing.
"""

from __future__ import annotations

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
