"""Errors a user can cause carry a message that names the fix and an exit code.

The CLI prints ``error: <message>`` on stderr (no traceback unless --verbose) and exits with
``exit_code``: 2 for usage and input errors, 1 for runtime failures.
"""
from __future__ import annotations


class ControlFlow(Exception):
    """Not an error: the engine ends a forward early (capture, an abandoned block).  Passes through hooks."""


class BlockquantError(Exception):
    """Base class: an error with a clear, one-line first message."""

    exit_code = 1


class UsageError(BlockquantError):
    """Bad arguments or input (a wrong path, an unknown adapter, invalid settings)."""

    exit_code = 2


class AdapterError(UsageError):
    """An adapter is unknown, broken, ambiguous, or returned something outside the contract."""


class VersionError(UsageError):
    """An installed library version is outside what the adapter supports."""


class DataError(UsageError):
    """Calibration data is missing, empty or too small."""


class ModelFileError(UsageError):
    """A model folder, shard or tensor is missing or corrupt."""


class ResourceError(BlockquantError):
    """Not enough disk or memory, or a device that does not exist."""


class Interrupted(BlockquantError):
    """The run was stopped by a signal; its state is resumable."""

    exit_code = 1


class HookError(BlockquantError):
    """An adapter's hook raised an exception that is not a blockquant error (a bug in the adapter, or a
    model it does not handle); the message names the adapter, the hook and the exception."""
