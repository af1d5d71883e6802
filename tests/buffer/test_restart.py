"""A crash of redis-server itself: after a SIGKILL and a restart on the same AOF, acknowledged
groups stay acknowledged, pending ones stay pending, and leases, cursor and version survive."""

from __future__ import annotations

from pathlib import Path

import pytest

from buffer.errors import LeaseMismatchError
from buffer.redis_server import EmbeddedRedis
from buffer.store import EpisodeStore
from tests.buffer.helpers import make_group, wait_aof_written, write_prompts


def test_state_survives_a_redis_crash_and_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    try:
        with EpisodeStore(url, "job", lease_seconds=30) as store:
            store.load_prompts(write_prompts(tmp_path / "d.jsonl", 5), shuffle=False)
            store.set_version(3)
            leases = store.lease_prompts("w", 3)
            pushed = [
                store.put_group(make_group(lease.prompt_id, version=3), lease_id=lease.lease_id)
                for lease in leases[:2]
            ]
            entries = [store.put_group(make_group(f"extra{i}", version=3)) for i in range(4)]
            taken = store.take_groups("trainer", 4, block_ms=0)
            acked = [t.entry_id for t in taken[:2]]
            store.ack(acked)  # the step using these was checkpointed
            pending = [t.entry_id for t in taken[2:]]
            before = store.stats()
        wait_aof_written(url)
        server.kill()
        url = server.start()  # same data dir, new port

        with EpisodeStore(url, "job", lease_seconds=30) as store:
            after = store.stats()
            same = ("groups_acked", "groups_pending", "groups_unconsumed", "groups_put",
                    "prompts_leased", "prompts_done", "cursor", "epoch", "version")  # fmt: skip
            for field in same:
                assert getattr(after, field) == getattr(before, field), field
            assert (after.groups_acked, after.groups_pending, after.groups_unconsumed) == (2, 2, 2)
            ids = [e.decode() for e, _ in store.client.xrange(store.keys.stream)]
            assert not set(acked) & set(ids)  # acknowledged: gone for good
            assert ids == pending + entries[2:]

            # the trainer resumes under its name: its pending groups first, then new ones
            resumed = store.take_groups("trainer", 10, block_ms=0)
            assert [t.entry_id for t in resumed] == pending + entries[2:]
            assert after.drops_stale == 0
            # the outstanding lease still completes exactly once; a completed one stays done
            p2 = make_group(leases[2].prompt_id, version=3)
            assert store.put_group(p2, lease_id=leases[2].lease_id) is not None
            p0 = make_group(leases[0].prompt_id, version=3)
            assert store.put_group(p0, lease_id=leases[0].lease_id) == pushed[0]
            with pytest.raises(LeaseMismatchError):
                store.put_group(p2, lease_id=leases[0].lease_id)
            assert store.stats().groups_put == before.groups_put + 1
            assert [lease.prompt_id for lease in store.lease_prompts("w", 2)] == ["p3", "p4"]
    finally:
        server.stop()


def test_a_store_keeps_working_across_a_server_restart(tmp_path: Path) -> None:
    """Clients reconnect by themselves; Lua scripts are reloaded into the fresh script cache."""
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    port = server.port
    try:
        with EpisodeStore(url, "job") as store:
            store.load_prompts(write_prompts(tmp_path / "d.jsonl", 4), shuffle=False)
            (lease,) = store.lease_prompts("w", 1)
            server.stop()
            # same address, same data, same password (the job keeps it in the run dir)
            fixed = EmbeddedRedis(tmp_path / "redis", port=port, password=server.password)
            fixed.start()
            server = fixed
            assert store.put_group(make_group("p0"), lease_id=lease.lease_id) is not None
            assert store.put_groups([make_group("x")])[0] is not None
            assert [lease.prompt_id for lease in store.lease_prompts("w", 2)] == ["p1", "p2"]
            taken = store.take_groups("t", 5, block_ms=0)
            assert [t.group.prompt_id for t in taken] == ["p0", "x"]
    finally:
        server.stop()
