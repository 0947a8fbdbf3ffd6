"""User-facing errors.

Anything a user can cause (a bad config key or value, missing or corrupt data, a
missing checkpoint, a wrong launcher set-up) raises :class:`UserError` with one
message that names what is wrong and what is allowed. The CLI prints the message
(no traceback) and exits with :data:`EXIT_USER_ERROR`.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


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
