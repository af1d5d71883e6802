"""A reward plugin that only takes time: it paces the CI trials' toy job.

On an idle machine the tiny job trains a step in ~0.05 s, so the few steps left after a
resume can end before the harness makes its next kill (the trial then tests one kill, not
two). Sleeping in a weight-0 reward bounds every step from below without changing what is
trained or its order.
"""

from __future__ import annotations

import time


def pace(episode, seconds: float) -> float:
    time.sleep(seconds)
    return 0.0
