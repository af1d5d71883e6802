"""The chaos trials' invariant checker fails on doctored records: a group trained twice, a
prompt lost, a prompt both trained and queued, a reshuffled or rebuilt prompt order."""

from __future__ import annotations

import dataclasses

from buffer.prompt_queue import epoch_order
from physarum.audit import BufferSnapshot, audit
from trainer.trained_log import TrainedGroup

IDS = [f"p{i}" for i in range(6)]
SEED = 3


def _clean() -> tuple[list[TrainedGroup], BufferSnapshot]:
    """Epoch 0 fully consumed (5 trained, 1 still in the stream), epoch 1 at position 2 (one
    trained, one leased)."""
    e0, e1 = epoch_order(IDS, SEED, 0, True), epoch_order(IDS, SEED, 1, True)
    trained = [TrainedGroup(1 + i // 2, f"1-{i}", p, 0) for i, p in enumerate(e0[:5])]
    trained.append(TrainedGroup(4, "1-9", e1[0], 1))
    buffer = BufferSnapshot(
        ids=IDS,
        seed=SEED,
        shuffle=True,
        epoch=1,
        cursor=2,
        order=e1,
        outstanding=[("stream", 0, e0[5]), ("lease", 1, e1[1])],
        stream_entries=["1-7"],
        groups_acked=6,
        prompts_filtered=0,
    )
    return trained, buffer


def test_clean_records_pass() -> None:
    trained, buffer = _clean()
    report = audit(trained, buffer)
    assert report.ok, report.summary()
    assert (report.trained, report.outstanding) == (6, 2)


def test_a_duplicated_group_is_trained_twice() -> None:
    trained, buffer = _clean()
    doctored = [*trained, trained[2]]
    report = audit(doctored, dataclasses.replace(buffer, groups_acked=7))
    assert not report.ok
    assert any(f"group {trained[2].entry_id} trained 2 times" in p for p in report.twice)


def test_the_same_prompt_in_two_groups_of_one_epoch_is_trained_twice() -> None:
    trained, buffer = _clean()
    again = dataclasses.replace(trained[0], entry_id="2-0", step=5)
    report = audit([*trained, again], dataclasses.replace(buffer, groups_acked=7))
    assert any(
        f"prompt {trained[0].prompt_id} of epoch 0 trained 2 times" in p for p in report.twice
    )


def test_a_trained_group_still_in_the_stream_would_be_trained_again() -> None:
    trained, buffer = _clean()
    report = audit(trained, dataclasses.replace(buffer, stream_entries=["1-7", "1-3"]))
    assert report.twice == ["group 1-3 trained and still unacknowledged"]


def test_a_prompt_trained_and_queued_again_is_reported() -> None:
    trained, buffer = _clean()
    queued = [*buffer.outstanding, ("retry", 0, trained[1].prompt_id)]
    report = audit(trained, dataclasses.replace(buffer, outstanding=queued))
    assert report.twice == [f"prompt {trained[1].prompt_id} of epoch 0 is trained and retry"]


def test_acks_that_do_not_match_the_lineage_are_reported() -> None:
    trained, buffer = _clean()
    report = audit(trained, dataclasses.replace(buffer, groups_acked=5))
    assert "the buffer acknowledged 5 groups, the checkpoint trained 6" in report.twice


def test_a_missing_prompt_is_lost() -> None:
    trained, buffer = _clean()
    report = audit(trained[1:], dataclasses.replace(buffer, groups_acked=5))
    assert report.lost == [(0, trained[0].prompt_id)]
    assert not report.ok


def test_a_filtered_prompt_is_not_lost() -> None:
    trained, buffer = _clean()
    report = audit(trained[1:], dataclasses.replace(buffer, groups_acked=5, prompts_filtered=1))
    assert report.ok, report.summary()


def test_a_prompt_consumed_beyond_the_cursor_breaks_the_order() -> None:
    trained, buffer = _clean()
    e1 = epoch_order(IDS, SEED, 1, True)
    queued = [*buffer.outstanding, ("lease", 1, e1[4])]  # skipped positions 2 and 3
    report = audit(trained, dataclasses.replace(buffer, outstanding=queued))
    assert report.order and "beyond the cursor" in report.order[0]


def test_a_reference_with_another_seed_breaks_the_order() -> None:
    trained, buffer = _clean()
    report = audit(trained, buffer, reference=lambda e: epoch_order(IDS, SEED + 1, e, True))
    assert report.order and not report.ok


def test_a_buffer_rebuilt_from_scratch_is_caught() -> None:
    """The prompts reloaded while the trainer resumed: cursor back at epoch 0 position 0,
    the groups the checkpoint trained are then neither expected nor consistent."""
    trained, buffer = _clean()
    rebuilt = dataclasses.replace(
        buffer, epoch=0, cursor=0, order=epoch_order(IDS, SEED, 0, True), outstanding=[]
    )
    report = audit(trained, rebuilt)
    assert report.order and not report.ok
