"""Errors of the episode-group side of the buffer that callers are expected to handle."""

from __future__ import annotations


class BufferFullError(TimeoutError):
    """put_group waited put_timeout_s while the buffer stayed at capacity."""


class LeaseMismatchError(ValueError):
    """put_group was given a lease for a different prompt than the group's prompt_id."""
