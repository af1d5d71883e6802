"""The episode-group stream against a real redis-server: take/ack, staleness, backpressure,
corrupt payloads, redelivery and reclaim."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from buffer.errors import BufferFullError, LeaseMismatchError, PutCancelledError
from tests.buffer.helpers import make_group, write_prompts


def test_take_returns_groups_in_order_and_ack_removes_them(make_store) -> None:
    store = make_store()
    entries = [store.put_group(make_group(f"p{i}", seed=i)) for i in range(5)]
    taken = store.take_groups("trainer-0", 3, block_ms=0)
    assert [t.entry_id for t in taken] == entries[:3]
    assert [t.group.prompt_id for t in taken] == ["p0", "p1", "p2"]
    assert taken[1].group.episodes[0].response_ids.tolist() == (
        make_group("p1", seed=1).episodes[0].response_ids.tolist()
    )
    stats = store.stats()
    assert (stats.groups_unconsumed, stats.groups_pending, stats.groups_put) == (2, 3, 5)
    store.ack([t.entry_id for t in taken])
    stats = store.stats()
    assert (stats.groups_unconsumed, stats.groups_pending, stats.groups_acked) == (2, 0, 3)
    assert store.client.xlen(store.keys.stream) == 2  # acked entries are deleted
    assert [t.entry_id for t in store.take_groups("trainer-0", 10, block_ms=0)] == entries[3:]
    assert store.take_groups("trainer-0", 1, block_ms=50) == []


def test_take_blocks_until_a_group_arrives(make_store) -> None:
    store = make_store()
    producer = threading.Timer(0.2, lambda: store.put_group(make_group("late")))
    producer.start()
    taken = store.take_groups("c", 1, block_ms=5000)
    producer.join()
    assert [t.group.prompt_id for t in taken] == ["late"]


def test_stale_groups_are_dropped_and_counted(make_store) -> None:
    store = make_store(max_staleness=1)
    assert store.drops_and_version() == (0, 0)  # nothing counted or set yet
    for version in (0, 1, 2, 3, 3):
        store.put_group(make_group(f"v{version}", version=version))
    store.set_version(3)
    stats = store.stats()
    assert stats.lag_versions == 3  # the head of the queue is 3 versions old
    taken = store.take_groups("c", 5, block_ms=0)
    assert [t.group.prompt_id for t in taken] == ["v2", "v3", "v3"]
    stats = store.stats()
    assert stats.drops_stale == 2
    assert store.drops_and_version() == (2, 3)  # the producer's two-read view of stats()
    assert stats.dropped_hist == {3: 1, 2: 1}
    assert stats.staleness_hist == {1: 1, 0: 2}
    assert stats.groups_pending == 3 and stats.groups_unconsumed == 0  # drops were acked
    assert store.client.xlen(store.keys.stream) == 3


def test_synchronous_mode_takes_only_the_current_version(make_store) -> None:
    store = make_store(max_staleness=0)
    store.set_version(5)
    store.put_group(make_group("old", version=4))
    store.put_group(make_group("new", version=5))
    assert [t.group.prompt_id for t in store.take_groups("c", 2, block_ms=0)] == ["new"]
    assert store.stats().drops_stale == 1


def test_backpressure_blocks_the_producer_until_the_trainer_takes(make_store) -> None:
    store = make_store(capacity=2)
    store.put_group(make_group("a"))
    store.put_group(make_group("b"))
    done = threading.Event()
    result: list[str | None] = []

    def produce() -> None:
        result.append(store.put_group(make_group("c")))
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    assert not done.wait(0.5)  # blocked: two unconsumed groups == capacity
    assert store.stats().groups_unconsumed == 2
    taken = store.take_groups("c", 1, block_ms=0)  # taking (not acking) makes room
    assert done.wait(10)
    thread.join()
    assert result[0] is not None
    stats = store.stats()
    assert (stats.groups_unconsumed, stats.groups_pending) == (2, 1)
    assert [t.group.prompt_id for t in taken] == ["a"]


def test_backpressure_times_out_with_a_clear_error(make_store) -> None:
    store = make_store(capacity=1, put_timeout_s=0.3)
    store.put_group(make_group("a"))
    with pytest.raises(BufferFullError, match=r"stayed full \(1 unconsumed groups\)"):
        store.put_group(make_group("b"))
    assert store.stats().groups_put == 1


def test_a_blocked_producer_keeps_its_lease(make_store, tmp_path) -> None:
    # 1 s leases (renewed every 1/3 s while waiting) leave a busy CPU slack; the wait is
    # still 2.5 leases long, so a producer that did not renew would lose its lease
    store = make_store(capacity=1, lease_seconds=1.0)
    store.load_prompts(write_prompts(tmp_path / "d.jsonl", 2), shuffle=False)
    first, second = store.lease_prompts("w", 2)
    store.put_group(make_group("p0"), lease_id=first.lease_id)
    # the timer requeues expired leases first: a lease the wait let lapse would be lost here
    timer = threading.Timer(
        2.5, lambda: (store.requeue_expired(), store.take_groups("c", 1, block_ms=0))
    )
    timer.start()
    entry = store.put_group(make_group("p1"), lease_id=second.lease_id)  # waits ~2.5 s
    timer.join()
    assert entry is not None
    stats = store.stats()
    assert (stats.lease_expiries, stats.late_pushes, stats.prompts_done) == (0, 0, 2)


def test_a_corrupt_payload_is_quarantined_not_fatal(make_store) -> None:
    store = make_store()
    client, keys = store.client, store.keys
    store.put_group(make_group("good-1"))
    client.set(keys.payload("bad"), b"PHEG\x01garbage")
    bad = client.xadd(keys.stream, {"r": "bad", "v": 0, "p": "x"}).decode()
    client.xadd(keys.stream, {"r": "gone", "v": 0, "p": "y"})  # its payload never existed
    client.xadd(keys.stream, {"p": "no-fields"})
    store.put_group(make_group("good-2"))
    taken = store.take_groups("c", 10, block_ms=0)
    assert [t.group.prompt_id for t in taken] == ["good-1", "good-2"]
    stats = store.stats()
    assert stats.corrupt == 3 and stats.groups_pending == 2 and stats.groups_unconsumed == 0
    quarantined = {q[1][b"entry"].decode(): q[1] for q in client.xrange(keys.quarantine)}
    assert b"EpisodeCodecError: header: truncated" in quarantined[bad][b"error"]
    assert quarantined[bad][b"g"] == b"PHEG\x01garbage"  # kept for inspection
    assert not client.exists(keys.payload("bad"))
    errors = b" ".join(q[b"error"] for q in quarantined.values())
    assert b"payload: missing" in errors and b"KeyError" in errors
    assert stats.staleness_hist == {0: 2}  # only the groups handed out are counted


def test_payloads_live_exactly_as_long_as_their_entries(make_store) -> None:
    store = make_store(max_staleness=0)
    client, pattern = store.client, f"{store.keys.payload_prefix}*"
    store.put_group(make_group("a"))
    store.put_group(make_group("stale", version=0))
    assert len(client.keys(pattern)) == 2
    assert all(client.ttl(k) == -1 for k in client.keys(pattern))  # persisted on push
    store.set_version(0)
    taken = store.take_groups("c", 1, block_ms=0)
    store.ack([t.entry_id for t in taken])
    store.set_version(1)
    assert store.take_groups("c", 1, block_ms=0) == []  # the stale one is dropped
    assert client.keys(pattern) == [] and client.xlen(store.keys.stream) == 0
    assert store.stats().groups_acked == 1


def test_a_restarted_consumer_gets_its_unacked_groups_again(make_store) -> None:
    first = make_store()
    entries = [first.put_group(make_group(f"p{i}")) for i in range(4)]
    taken = first.take_groups("trainer-0", 3, block_ms=0)
    first.ack([taken[0].entry_id])  # step 1 checkpointed; steps with p1, p2 were not
    assert first.take_groups("trainer-0", 3, block_ms=0)[0].entry_id == entries[3]

    restarted = make_store()  # a new process under the same consumer name
    again = restarted.take_groups("trainer-0", 10, block_ms=0)
    assert [t.entry_id for t in again] == entries[1:]
    assert [t.group.prompt_id for t in again] == ["p1", "p2", "p3"]
    assert restarted.take_groups("trainer-0", 10, block_ms=0) == []  # handed out once


def test_reclaim_moves_a_dead_consumers_groups(make_store) -> None:
    store = make_store()
    entries = [store.put_group(make_group(f"p{i}")) for i in range(3)]
    assert len(store.take_groups("dead", 2, block_ms=0)) == 2
    other = make_store()
    assert other.reclaim("live", min_idle_ms=60_000) == 0  # not idle long enough
    time.sleep(0.05)
    assert other.reclaim("live", min_idle_ms=20) == 2
    got = other.take_groups("live", 10, block_ms=0)
    assert [t.entry_id for t in got] == entries
    other.ack([t.entry_id for t in got])
    stats = other.stats()
    assert (stats.groups_pending, stats.groups_unconsumed, stats.groups_acked) == (0, 0, 3)


def test_version_round_trip_and_validation(make_store) -> None:
    store = make_store()
    assert store.get_version() == 0
    store.set_version(12)
    assert make_store().get_version() == 12
    with pytest.raises(ValueError, match="version: expected an int >= 0"):
        store.set_version(-1)


def test_put_groups_pushes_a_batch_with_per_group_outcomes(make_store, tmp_path) -> None:
    store = make_store(capacity=3, lease_seconds=0.2)
    store.load_prompts(write_prompts(tmp_path / "d.jsonl", 3), shuffle=False)
    leases = store.lease_prompts("w", 3)
    time.sleep(0.3)
    store.requeue_expired()  # p0..p2's leases expired; re-lease only p0 and p1
    fresh = store.lease_prompts("w", 2, lease_seconds=30)
    groups = [make_group(lease.prompt_id) for lease in fresh + leases[2:]]
    ids = store.put_groups(groups, [lease.lease_id for lease in fresh + leases[2:]])
    assert ids[0] and ids[1] and ids[2] is None  # the third lease was stale
    threading.Timer(0.3, lambda: store.take_groups("c", 2, block_ms=0)).start()
    more = store.put_groups([make_group("x"), make_group("y")])  # waits for room
    assert all(more) and store.stats().groups_put == 4
    with pytest.raises(ValueError, match="lease_ids: 1 given for 2 groups"):
        store.put_groups([make_group("x"), make_group("y")], ["L1"])


def test_the_prompt_of_a_stale_leased_group_is_generated_again(make_store, tmp_path) -> None:
    store = make_store(max_staleness=0)
    store.load_prompts(write_prompts(tmp_path / "d.jsonl", 2), shuffle=False, max_epochs=1)
    (lease,) = store.lease_prompts("w", 1)
    store.put_group(make_group("p0", version=0), lease_id=lease.lease_id)
    store.put_group(make_group("unleased", version=0))
    store.set_version(1)
    assert store.take_groups("c", 2, block_ms=0) == []
    again = store.lease_prompts("w", 5)
    assert [(x.prompt_id, x.epoch) for x in again] == [("p0", 0), ("p1", 0)]
    stats = store.stats()
    assert (stats.drops_stale, stats.stale_requeued) == (2, 1)
    store.put_group(make_group("p0", version=1), lease_id=again[0].lease_id)
    assert [t.group.prompt_id for t in store.take_groups("c", 2, block_ms=0)] == ["p0"]


def test_one_push_call_decides_each_group_in_order_against_capacity(make_store) -> None:
    """put_groups runs one script call for the batch: the groups that fit go in, in order;
    the rest wait for room and follow in order once the trainer takes."""
    store = make_store(capacity=2, put_timeout_s=30)
    result: list[list[str | None]] = []
    thread = threading.Thread(
        target=lambda: result.append(store.put_groups([make_group(f"b{i}") for i in range(4)]))
    )
    thread.start()
    first = store.take_groups("c", 2, block_ms=10_000)  # the two that fit, pushed at once
    rest = store.take_groups("c", 2, block_ms=10_000)
    thread.join(30)
    assert [t.group.prompt_id for t in first + rest] == ["b0", "b1", "b2", "b3"]
    assert result[0] == [t.entry_id for t in first + rest]
    assert store.stats().groups_put == 4


def test_round_trips_per_call(make_store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch put is one round trip, a take two (version + entries, then payloads), an ack
    one; a take that meets a corrupt payload adds one to quarantine it (and reads again to
    fill its batch)."""
    store = make_store()
    store.take_groups("c", 1, block_ms=0)  # scans (empty) pending list once per consumer
    trips: list[bytes] = []
    send = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        packed = b"".join(command) if isinstance(command, list) else command
        if b"PING" not in packed[:32]:  # the pool's idle health check is not ours
            trips.append(packed)
        return send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    ids = store.put_groups([make_group(f"p{i}") for i in range(8)])
    assert len(trips) == 1
    taken = store.take_groups("c", 8, block_ms=0)
    assert len(trips) == 3 and [t.entry_id for t in taken] == ids
    store.ack(ids)
    assert len(trips) == 4
    store.client.xadd(store.keys.stream, {"r": "gone", "v": 0, "p": "x"})
    trips.clear()
    assert store.take_groups("c", 8, block_ms=0) == []
    assert len(trips) == 4 and store.stats().corrupt == 1


def test_an_ack_from_another_process_finds_the_payloads_itself(make_store) -> None:
    """The taking store knows its entries' payload tokens; a store that did not take them
    (a restarted trainer acking a checkpoint's ids) has the script read them from the
    entries. Acks of more than one script chunk (1000 ids) work, unknown ids are ignored."""
    taker, other = make_store(), make_store()
    ids = [taker.put_group(make_group(f"p{i}")) for i in range(3)]
    taken = taker.take_groups("c", 3, block_ms=0)
    assert [t.entry_id for t in taken] == ids
    pattern = f"{taker.keys.payload_prefix}*"
    other.ack([ids[0]] + [f"1-{i}" for i in range(1200)] + [ids[1]])
    taker.ack([ids[2]])
    client = taker.client
    assert client.keys(pattern) == [] and client.xlen(taker.keys.stream) == 0
    stats = taker.stats()
    assert (stats.groups_acked, stats.groups_pending) == (3, 0)


def test_put_groups_can_be_cancelled_while_waiting_for_room(make_store) -> None:
    """A batch whose tail finds the buffer full: the head is pushed, a set `cancel` ends the
    wait at once, and the error says which groups went in; the rest leave no payload."""
    store = make_store(capacity=1, put_timeout_s=30)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(PutCancelledError) as caught:
        store.put_groups([make_group("a"), make_group("b")], cancel=cancel)
    pushed, refused = caught.value.results
    assert pushed is not None and refused is None
    assert len(store.client.keys(f"{store.keys.payload_prefix}*")) == 1  # a's only
    (taken,) = store.take_groups("c", 2, block_ms=0)
    assert (taken.entry_id, taken.group.prompt_id) == (pushed, "a")


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_concurrent_put_group_calls_share_a_round_trip(make_store, monkeypatch) -> None:
    """Groups put by other threads while a push is in flight go together in the next one
    (a group commit); each caller still gets its own entry id."""
    store = make_store()
    writer = store._writer
    sizes: list[int] = []
    gate = threading.Event()
    attempt = writer._attempt

    def gated(pushes):  # the first trip waits until three more callers have queued
        sizes.append(len(pushes))
        if len(sizes) == 1:
            gate.wait(30)
        return attempt(pushes)

    monkeypatch.setattr(writer, "_attempt", gated)
    ids: dict[str, str | None] = {}

    def put(name: str) -> None:
        ids[name] = store.put_group(make_group(name))

    threads = [threading.Thread(target=put, args=(name,)) for name in "abcd"]
    threads[0].start()
    _wait_for(lambda: sizes == [1], "the first push")
    for thread in threads[1:]:
        thread.start()
    _wait_for(lambda: len(writer._queue) == 3, "three queued puts")
    gate.set()
    for thread in threads:
        thread.join(30)
    assert sizes == [1, 3]
    taken = store.take_groups("c", 4, block_ms=0)
    assert taken[0].group.prompt_id == "a"
    assert {t.group.prompt_id: t.entry_id for t in taken} == ids
    assert store.stats().groups_put == 4


def test_a_mismatched_lease_in_a_batch_does_not_hold_back_the_others(make_store, tmp_path) -> None:
    store = make_store()
    store.load_prompts(write_prompts(tmp_path / "d.jsonl", 2), shuffle=False)
    p0, p1 = store.lease_prompts("w", 2)
    with pytest.raises(LeaseMismatchError, match="leases prompt 'p1', not 'x'"):
        store.put_groups([make_group("x"), make_group("p0")], [p1.lease_id, p0.lease_id])
    (taken,) = store.take_groups("c", 2, block_ms=0)
    assert taken.group.prompt_id == "p0"
    assert len(store.client.keys(f"{store.keys.payload_prefix}*")) == 1  # p0's only
