"""Reward plugins for the isolation tests: one that hangs until the test releases it."""

from __future__ import annotations

import threading

from buffer.episode import Episode

RELEASE = threading.Event()  # set by the test at its end so the hung threads finish


def hangs_until_released(episode: Episode) -> float:
    """A sync plugin stuck in a call it cannot leave (as a blocking socket read would be)."""
    RELEASE.wait()
    return 0.0
