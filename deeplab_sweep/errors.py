"""The errors a user sees, by what they are. Every layer raises these; only the CLI turns them
into exit codes. This module imports nothing, so the lowest layer (datasets) may use it.

- `UserInputError` (exit 2): the input is wrong or unusable, said in one line that names the
  file, key or value, before any cluster work.
- `RunFailed` (exit 1): a run that started and then failed on its own (its innermost error).
"""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input, worded for the user in one line: exit code 2."""


class ConfigError(UserInputError, ValueError):
    """A config file, key or value: malformed, unknown, out of range, or inconsistent."""


class ServiceUnreachable(UserInputError, ConnectionError):
    """A tracking server, Ray cluster or storage location named in the input does not answer."""


class StorageUnusable(UserInputError):
    """A storage location that cannot be written or cannot hold one checkpoint."""


class DatasetError(UserInputError, RuntimeError):
    """A problem with the data on disk (missing, corrupt, mismatched, unexpected labels), or a
    download that cannot be done here; the message names the file."""


class RunFailed(RuntimeError):
    """A run that failed after it started (the training's own error, not the input): exit 1."""
