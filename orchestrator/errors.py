"""One exception hierarchy for everything orchestrator raises on purpose.

Every error says what went wrong in the user's terms (the dataset, the file, the key) and what to
do about it. Library exceptions (botocore, deltalake, pyarrow, PIL) are wrapped, never leaked.
Errors survive pickling across Ray worker processes, so a failure inside a Ray Data stage reaches
the driver as the same class with the same message.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "AccessDenied",
    "ConfigError",
    "DatasetNotFound",
    "ExportError",
    "IngestError",
    "ItemError",
    "OrchestratorError",
    "QueryError",
    "StoreError",
    "StoreUnavailable",
    "VersionNotFound",
]


class OrchestratorError(Exception):
    """Base of every error orchestrator raises deliberately.

    ``user_fault`` tells callers (and the CLI's exit code) whether the input was wrong (True) or
    the system failed (False: the store was unreachable, a commit could not land).
    """

    user_fault: bool = True

    def __init__(
        self, message: str, *, hint: str | None = None, user_fault: bool | None = None
    ) -> None:
        self.message = message
        self.hint = hint
        if user_fault is not None:
            self.user_fault = user_fault
        super().__init__(message if not hint else f"{message}\n  fix: {hint}")

    def __reduce__(self) -> tuple[Any, ...]:  # keep class, message and hint across process boundaries
        return (_rebuild, (type(self), self.message, self.hint, dict(self.__dict__)))


def _rebuild(cls: type[OrchestratorError], message: str, hint: str | None, state: dict) -> OrchestratorError:
    err = cls.__new__(cls)
    OrchestratorError.__init__(err, message, hint=hint)
    err.__dict__.update(state)
    return err


class StoreError(OrchestratorError):
    """The store could not be reached, read or written (bad URI, network, credentials).
    ``transient``: the store did not answer (a retry loop may try again)."""

    user_fault = False
    transient = False


class StoreUnavailable(StoreError):
    """The store did not answer (down, stalled, overloaded) for longer than the retry deadline.

    Never an item's fault: readers raise it instead of skipping items, and nothing is committed
    (see ``orchestrator.retry``).
    """

    transient = True


class DatasetNotFound(StoreError, KeyError):
    """A dataset name that the store does not hold."""

    user_fault = True

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return Exception.__str__(self)


class VersionNotFound(StoreError, KeyError):
    """A dataset version number that was never committed."""

    user_fault = True

    def __str__(self) -> str:
        return Exception.__str__(self)


class QueryError(OrchestratorError, ValueError):
    """A slice query that does not parse or does not type-check."""


class IngestError(OrchestratorError):
    """An ingest that cannot proceed (bad source file, strict-mode rejection)."""


class ExportError(OrchestratorError):
    """An export that cannot start or finish: an output folder that is not empty (without
    ``overwrite``), that would hold the store or the current folder, or cannot be written."""


class ItemError(OrchestratorError):
    """One item cannot be read: its blob is missing (the store said so), corrupt (bytes that do
    not match the hash) or does not decode. ``reason`` is ``missing``, ``corrupt`` or
    ``undecodable``; ``on_error="skip"`` skips these and nothing else (a store that does not
    answer is a ``StoreUnavailable``, never an item's fault).

    A known reason is also the last line of the error's text (``  reason: missing``), because some
    boundaries keep only the text: a DataLoader worker's error is re-raised by torch as
    ``ItemError(text)``, and Ray and ``tf.data`` pass the traceback text on
    (``ray_runtime.orchestrator_error_in`` reads it back). An ``ItemError`` made from such a
    text without a ``reason`` takes the one the text names."""

    def __init__(self, message: str, *, hint: str | None = None, reason: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason or reason_in(message) or "unreadable"

    def __str__(self) -> str:
        reason = getattr(self, "reason", "unreadable")
        text = super().__str__()
        return text if reason == "unreadable" else f"{text}\n  reason: {reason}"


ITEM_ERROR_REASONS = ("missing", "corrupt", "undecodable", "unreadable")
_REASON_LINE = re.compile(r"^  reason: (" + "|".join(ITEM_ERROR_REASONS) + r")$", re.MULTILINE)


def reason_in(text: str) -> str | None:
    """The last ``  reason: X`` line of an ``ItemError``'s text, if any."""
    found = _REASON_LINE.findall(text)
    return found[-1] if found else None


class ConfigError(OrchestratorError, ValueError):
    """A configuration file or value that does not validate."""


class AccessDenied(OrchestratorError, PermissionError):
    """The principal may not perform this action on this dataset."""
