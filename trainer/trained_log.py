"""Which episode groups every checkpointed RL step trained on: `trained_groups.json`.

Rank 0 writes it into each checkpoint, cumulative over the run's whole lineage (a resume
loads it from the checkpoint it restores), so the newest checkpoint alone says which groups
the saved model has seen even after older checkpoints were pruned (`keep_last`). One row per
group: the step (policy version after it), the stream entry id, the prompt id and the epoch
the prompt was leased in (None for a group pushed without a lease). Steps trained after the
last checkpoint are not in it: a resume trains them again from the unacknowledged groups.

The chaos trials' invariant checker (physarum/audit.py) reads it; nothing in the job does.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

TRAINED_FILE = "trained_groups.json"


@dataclass(frozen=True)
class TrainedGroup:
    """One group a checkpointed step trained on."""

    step: int
    entry_id: str
    prompt_id: str
    epoch: int | None


def write_trained(directory: Path, groups: list[TrainedGroup]) -> None:
    """Write the lineage atomically (before MANIFEST.json, so it is checksummed too)."""
    tmp = directory / (TRAINED_FILE + ".tmp")
    tmp.write_text(json.dumps([asdict(g) for g in groups]))
    os.replace(tmp, directory / TRAINED_FILE)


def read_trained(directory: Path) -> list[TrainedGroup] | None:
    """The lineage of the checkpoint in `directory`; None if it has no record (older)."""
    path = directory / TRAINED_FILE
    if not path.exists():
        return None
    try:
        return [TrainedGroup(**row) for row in json.loads(path.read_text())]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a list of trained-group records ({exc})") from exc
