"""What a resume may trust: the newest checkpoint that passes its checksums, and a buffer
whose state matches that checkpoint.

`pick_checkpoint` verifies the complete checkpoints from the newest down. One that fails
(truncated, corrupted, a file missing) is moved aside to `checkpoints/corrupt_step_N` (so it
is neither loaded nor mistaken later for a saved step) and the previous intact one is used,
with a warning naming both. None intact: CheckpointCorruptError.

`check_buffer` compares the live buffer with the `buffer_state.json` the checkpoint wrote:
 - acknowledged groups: the buffer must have acked exactly the groups of the checkpointed
   steps (`acked_after`), or all but this checkpoint's (`acked_before`: the job died between
   COMPLETE and the ack; the restore repairs that). Fewer: groups already trained would be
   trained again. More: groups were acked for steps this checkpoint does not hold, allowed
   only when they belong to a newer checkpoint that was set aside as corrupt (a warning);
 - the policy version and the prompt cursor must not be behind the checkpoint's (a buffer
   rebuilt from scratch starts the dataset again while the trainer continues).
A mismatch stops the resume with BufferMismatchError, before anything is loaded or acked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from physarum.errors import UserError
from physarum.rundir import RunDir
from trainer.checkpoint_record import BufferRecord, has_manifest, read_buffer_record, verify

log = logging.getLogger(__name__)


class CheckpointCorruptError(UserError):
    """Every complete checkpoint of the run dir fails its checksums."""


class BufferMismatchError(UserError):
    """The buffer's state does not match the checkpoint a resume would load."""


def _set_aside(path: Path) -> Path:
    target = path.with_name(f"corrupt_{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"corrupt_{path.name}.{n}")
    path.rename(target)
    return target


Corrupt = list[tuple[int, Path, list[str]]]  # (step, dir, what is wrong), newest first


def pick_checkpoint(run: RunDir) -> tuple[tuple[int, Path] | None, Corrupt]:
    """(the newest intact checkpoint or None, the newer ones that failed their checksums).
    Changes nothing: `set_aside` moves the corrupt ones once the resume goes ahead."""
    corrupt: Corrupt = []
    for step, path in reversed(run.complete_checkpoints()):
        if not has_manifest(path):  # written before checksums existed: nothing to check
            log.warning("%s has no MANIFEST.json (an older checkpoint): loaded unchecked", path)
            problems: list[str] = []
        else:
            problems = verify(path)
        if not problems:
            return (step, path), corrupt
        corrupt.append((step, path, problems))
    if corrupt:
        listed = "; ".join(f"{p}: {', '.join(bad)}" for _, p, bad in corrupt)
        raise CheckpointCorruptError(
            f"every checkpoint of {run.root} fails its checksums ({listed}); nothing was "
            f"loaded or changed. Restore {run.checkpoints} from a backup, or start the job "
            "afresh with --overwrite"
        )
    return None, []


def set_aside(corrupt: Corrupt, used: tuple[int, Path]) -> None:
    """Move each corrupt checkpoint to corrupt_step_N, warning with it and the one used."""
    for _, bad_path, bad in corrupt:
        moved = _set_aside(bad_path)
        log.warning(
            "checkpoint %s is corrupt (%s): resuming from the previous intact checkpoint %s "
            "(step %d) instead; the corrupt one is kept as %s",
            bad_path, "; ".join(bad), used[1], used[0], moved,
        )  # fmt: skip


def _way_out(run: RunDir) -> str:
    return (
        "Nothing was loaded, acknowledged or changed. Way out: restore the run dir's redis/ "
        "and checkpoints/ from one moment (a backup taken with the job stopped), or start "
        f"the job afresh: `physarum run CONFIG --overwrite` with run_dir {run.root} (or "
        "another run_dir)"
    )


def check_buffer(
    run: RunDir, checkpoint: tuple[int, Path] | None, stats: dict[str, Any], corrupt: Corrupt
) -> None:
    """BufferMismatchError when `stats` (the live buffer's) cannot continue `checkpoint`."""
    acked = int(stats.get("groups_acked", 0))
    if checkpoint is None:
        if acked > 0:
            raise BufferMismatchError(
                f"{run.root} has no complete checkpoint, but its buffer ({run.redis}) has "
                f"acknowledged {acked} episode groups, which only a checkpoint does: the "
                f"checkpoints were lost, and a restart from step 0 would skip those groups. "
                + _way_out(run)
            )
        return
    step, path = checkpoint
    record = read_buffer_record(path)
    if record is None:  # an older checkpoint, or one of a job without a buffer
        return
    problems = _mismatches(record, stats)
    if acked > record.acked_after:
        extra = acked - record.acked_after
        if not corrupt:
            problems.append(
                f"the buffer acknowledged {extra} more groups than the checkpoint's steps "
                f"used ({acked} vs {record.acked_after}): a newer checkpoint that used them "
                "is gone, and resuming would never train on them"
            )
        else:
            log.warning(
                "the buffer acknowledged %d groups after checkpoint step %d, used by the "
                "steps of the corrupt checkpoint(s) %s: they are not trained again (the "
                "resumed job takes fresh groups for those steps)",
                extra, step, [s for s, _, _ in corrupt],
            )  # fmt: skip
    if problems:
        raise BufferMismatchError(
            f"the buffer in {run.redis} does not match checkpoint {path} (step {step}, "
            f"version {record.version}): " + "; ".join(problems) + ". " + _way_out(run)
        )


def _mismatches(record: BufferRecord, stats: dict[str, Any]) -> list[str]:
    problems = []
    acked = int(stats.get("groups_acked", 0))
    if acked < record.acked_before:
        problems.append(
            f"the buffer has acknowledged {acked} episode groups but the checkpoint's steps "
            f"used {record.acked_after} ({record.acked_before} before its own): groups "
            "already trained on would be trained again"
        )
    version = int(stats.get("version", 0))
    if version < record.version:
        problems.append(
            f"the buffer's policy version is {version}, behind the checkpoint's {record.version}"
        )
    here = (int(stats.get("epoch", 0)), int(stats.get("cursor", 0)))
    if here < (record.epoch, record.cursor):
        problems.append(
            f"the buffer's prompt cursor is at epoch {here[0]} position {here[1]}, behind the "
            f"checkpoint's epoch {record.epoch} position {record.cursor}: the prompts were "
            "loaded again from the start"
        )
    return problems
