"""Errors of the episode-group side of the buffer that callers are expected to handle."""

from __future__ import annotations


class BufferFullError(TimeoutError):
    """put_group waited put_timeout_s while the buffer stayed at capacity."""


class PutCancelledError(RuntimeError):
    """A producer that is stopping cancelled put_many while it waited for room.

    `results` holds the entry id of each item that was pushed before the cancel, and None
    for the items that were not (their payloads are deleted; their leases stay held, for
    the caller to release).
    """

    def __init__(self, message: str, results: list[str | None]) -> None:
        super().__init__(message)
        self.results = results


class LeaseMismatchError(ValueError):
    """put_group was given a lease for a different prompt than the group's prompt_id."""
