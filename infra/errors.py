"""Infra: the exception family every stage raises.

User-facing errors (``AudiopipeError`` and subclasses) carry a message that says what to fix; the CLI
prints them as one paragraph with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AudiopipeError(Exception):
    """Base of all errors audiopipe raises on purpose."""


class ConfigError(AudiopipeError):
    """A parameter or config file is invalid; raised before any work is submitted."""


class StorageError(AudiopipeError):
    """The store cannot be used as asked (unreachable, bad credentials, missing bucket, empty input)."""


class TransientStorageError(StorageError):
    """A storage call failed in a way that may succeed on retry (connection reset, 5xx, timeout)."""


class ShardsFailedError(StorageError):
    """A run finished, but some shards could not be committed after their retries.

    Committed shards are kept and the same command finishes the rest. ``summary`` is the run's summary
    (a plain dict), so a caller can still report what was done; both arguments stay in ``args`` so the
    error pickles whole.
    """

    def __init__(self, message: str, summary: dict | None = None) -> None:
        super().__init__(message, summary or {})
        self.summary = summary or {}

    def __str__(self) -> str:
        return str(self.args[0])


class BadAudioError(AudiopipeError):
    """One input cannot be decoded into usable audio; the file is rejected with this message."""


class SchemaError(AudiopipeError):
    """A table does not match the data contract it claims to follow."""
