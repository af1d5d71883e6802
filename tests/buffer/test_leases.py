"""Prompt leases against a real redis-server: epochs, expiry and requeue, late pushes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from buffer.errors import LeaseMismatchError
from buffer.prompt_queue import NoDatasetError, epoch_order
from tests.buffer.helpers import make_group, write_prompts


def _ids(leases) -> list[str]:
    return [lease.prompt_id for lease in leases]


def test_epochs_follow_a_seeded_shuffle_and_stop_at_max_epochs(make_store, tmp_path) -> None:
    store = make_store()
    store.load_prompts(write_prompts(tmp_path / "d.jsonl", 10), seed=7, max_epochs=2)
    first = store.lease_prompts("w", 4)
    assert first[0].row["messages"][0]["content"] == f"q{first[0].prompt_id[1:]}"
    rest = store.lease_prompts("w", 100)  # crosses into epoch 1 and stops at its end
    leases = first + rest
    assert [lease.epoch for lease in leases] == [0] * 10 + [1] * 10
    base = [f"p{i}" for i in range(10)]
    assert _ids(leases[:10]) == epoch_order(base, 7, 0, True)
    assert _ids(leases[10:]) == epoch_order(base, 7, 1, True)
    assert _ids(leases[:10]) != _ids(leases[10:])  # each epoch has its own order
    assert sorted(_ids(leases[:10])) == sorted(base)
    assert store.lease_prompts("w", 3) == []
    stats = store.stats()
    assert (stats.epoch, stats.cursor, stats.prompts_leased, stats.prompts_queued) == (1, 10, 20, 0)


def test_unlimited_epochs_and_a_cursor_shared_across_stores(make_store, tmp_path) -> None:
    path = write_prompts(tmp_path / "d.jsonl", 3)
    a, b = make_store(), make_store()
    a.load_prompts(path, shuffle=False)
    b.load_prompts(path, shuffle=False)  # idempotent: same cursor
    got = (
        _ids(a.lease_prompts("a", 2))
        + _ids(b.lease_prompts("b", 5))
        + _ids(a.lease_prompts("a", 2))
    )
    assert got == ["p0", "p1", "p2", "p0", "p1", "p2", "p0", "p1", "p2"]
    assert b.stats().epoch == 2


def _wait_for(poll, timeout_s: float = 10.0):
    """poll() until it returns something truthy (a lease expiring), at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (result := poll()):
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.05)
    return result


def test_leasing_without_a_dataset_is_an_error(make_store) -> None:
    with pytest.raises(NoDatasetError, match="call load_prompts first"):
        make_store().lease_prompts("w", 1)


def test_an_expired_lease_is_requeued_and_its_late_push_refused(make_store, tmp_path) -> None:
    # 1 s leases: the "not yet expired" check needs no race against a busy CPU; the expiry
    # itself is awaited, not slept for
    store = make_store(lease_seconds=1.0)
    store.load_prompts(write_prompts(tmp_path / "d.jsonl", 3), shuffle=False, max_epochs=1)
    dead, alive = store.lease_prompts("dead-worker", 2)
    store.renew_lease(alive.lease_id, 30.0)
    assert store.requeue_expired() == 0
    assert _wait_for(store.requeue_expired) == 1  # only the lease that was not renewed
    assert store.renew_lease(dead.lease_id) is None

    retry = store.lease_prompts("w2", 2)
    assert _ids(retry) == ["p0", "p2"]  # the requeued prompt is served before the cursor
    assert retry[0].lease_id != dead.lease_id and retry[0].epoch == 0
    assert store.put_group(make_group("p0"), lease_id=dead.lease_id) is None  # late: refused
    entry = store.put_group(make_group("p0"), lease_id=retry[0].lease_id)
    assert entry is not None
    assert store.put_group(make_group("p0"), lease_id=retry[0].lease_id) == entry  # idempotent
    assert store.put_group(make_group("p1"), lease_id=alive.lease_id) is not None

    stats = store.stats()
    assert (stats.lease_expiries, stats.late_pushes, stats.prompts_done) == (1, 1, 2)
    payloads = store.client.keys(f"{store.keys.payload_prefix}*")
    assert len(payloads) == 2  # refused and duplicate pushes left no payload behind
    assert stats.groups_unconsumed == 2 and stats.prompts_leased == 1
    taken = store.take_groups("t", 10, block_ms=0)
    assert sorted(t.group.prompt_id for t in taken) == ["p0", "p1"]  # p0 once, not twice


def test_leasing_runs_the_requeue_itself(make_store, tmp_path) -> None:
    store = make_store(lease_seconds=1.0)  # no race for the "still leased" check
    store.load_prompts(write_prompts(tmp_path / "d.jsonl", 1), max_epochs=1)
    (lease,) = store.lease_prompts("w", 1)
    assert store.lease_prompts("w", 1) == []
    (again,) = _wait_for(lambda: store.lease_prompts("w", 1))  # no explicit requeue_expired
    assert again.prompt_id == lease.prompt_id and store.stats().lease_expiries == 1


def test_release_and_filtered_completion(make_store, tmp_path: Path) -> None:
    store = make_store()
    store.load_prompts(write_prompts(tmp_path / "d.jsonl", 3), shuffle=False, max_epochs=1)
    p0, p1 = store.lease_prompts("w", 2)
    assert store.release_lease(p0.lease_id) is True
    assert store.release_lease(p0.lease_id) is False
    assert store.release_lease(p1.lease_id, True) is True  # e.g. dropped by dynamic sampling
    assert _ids(store.lease_prompts("w", 5)) == ["p0", "p2"]  # p1 is not served again
    stats = store.stats()
    assert (stats.prompts_filtered, stats.lease_expiries, stats.prompts_leased) == (1, 0, 2)


def test_a_lease_for_another_prompt_is_rejected(make_store, tmp_path: Path) -> None:
    store = make_store()
    store.load_prompts(write_prompts(tmp_path / "d.jsonl", 2), shuffle=False)
    (lease,) = store.lease_prompts("w", 1)
    with pytest.raises(LeaseMismatchError, match="leases prompt 'p0', not 'p1'"):
        store.put_group(make_group("p1"), lease_id=lease.lease_id)
    assert store.stats().groups_put == 0 and store.stats().prompts_leased == 1
