"""The embedded engine's counters as one flat dict (`EmbeddedEngine.stats`)."""

from __future__ import annotations

from rollout.embedded.scheduler import Scheduler
from rollout.embedded.updates import WeightUpdates


def engine_stats(
    sched: Scheduler, updates: WeightUpdates, seconds: dict[str, float]
) -> dict[str, int]:
    """Queue sizes and counters (read without locking; approximate while running)."""
    return {
        "num_running": len(sched.running),
        "num_waiting": len(sched.waiting),
        "num_free_slots": sched.slots.num_free,
        "num_forwards": sched.num_forwards,
        "num_prefill_rows": sched.num_prefill_rows,
        "num_prefill_forwards": sched.num_prefill_forwards,
        "num_decode_forwards": sched.num_decode_forwards,
        "num_decode_rows": sched.num_decode_rows,
        "num_folded_prefills": sched.num_folded_prefills,
        **{f"decode_batch_le_{1 << i}": n for i, n in enumerate(sched.decode_batch_hist) if n},
        "num_updates": updates.count,
        "time_update_s": updates.seconds,
        **{f"time_{k}_s": v for k, v in (seconds | sched.seconds).items()},
        "weight_version": sched.version,
        "pending_weight_updates": len(updates.pending),
    }
