"""How pushes reach Redis: resp.FastPacker packs exactly what redis-py's packer would, the
codec's framed record is the plain record with the frame around it, and the payloads of a
push (an MSET in the push's transaction) are persisted, given a TTL while they wait for
room, and survive a flushed script cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import redis
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

from buffer.codec import encode_group, encode_group_versioned
from buffer.group_writer import GroupWriter
from buffer.keys import Keys
from buffer.resp import PREPACKED, FastPacker, command_head, pair_frame
from tests.buffer.helpers import make_group


def _default_pack(*args: object) -> bytes:
    encode = Encoder("utf-8", "strict", False).encode
    packer = HiredisRespSerializer(PythonRespSerializer(6000, encode).pack, encode)
    return b"".join(packer.pack(*args))


@pytest.mark.parametrize(
    "args",
    [
        (b"SET", b"k", b"v" * 10_000, b"EX", b"10"),
        ("HINCRBY", "physarum:{ns}:stats", "groups_put", -3),
        (b"XREADGROUP", b"GROUP", "trainer", "c", b"COUNT", 32, b"BLOCK", 0, b"STREAMS", "s", ">"),
        ("CONFIG GET", "maxmemory"),  # a name with a space: split by redis-py's packer
        (b"INCRBYFLOAT", b"k", 0.1),  # a float: redis-py's packer (repr)
        (b"SET", b"k", memoryview(b"abc")),  # a memoryview: redis-py's packer
        ("SET", "ké", "vé"),
    ],
)
def test_fast_packer_sends_what_redis_py_would(args: tuple) -> None:
    assert b"".join(FastPacker().pack(*args)) == _default_pack(*args)


def test_a_prepacked_mset_is_the_command_redis_py_would_send() -> None:
    pairs = [(b"a", b"x" * 7000), (b"bb", b"")]
    framed = [b"%s%s%s" % (pair_frame(k, len(v))[0], v, pair_frame(k, len(v))[1]) for k, v in pairs]
    packed = FastPacker().pack(PREPACKED, command_head(b"MSET", 4), *framed)
    assert b"".join(packed) == _default_pack(b"MSET", *[x for pair in pairs for x in pair])


def test_a_framed_record_is_the_record_inside_its_frame() -> None:
    group = make_group("p", n=3, version=2)
    sizes: list[int] = []

    def frame(size: int) -> tuple[bytes, bytes]:
        sizes.append(size)
        return b"<%d>" % size, b"</>"

    blob, oldest = encode_group_versioned(group, frame)
    record = encode_group(group)
    assert (blob, oldest) == (b"<%d>" % len(record) + record + b"</>", 2)
    # arrays whose lengths disagree with the header (decode quarantines the record): framed
    # as the record comes out
    group.episodes[0].rollout_logprobs = np.zeros(30, np.float32)
    record, oldest = encode_group_versioned(group)
    assert encode_group_versioned(group, frame) == (b"<%d>" % len(record) + record + b"</>", oldest)
    assert sizes[-1] == len(record)


def test_a_payload_waiting_for_room_has_a_ttl_and_loses_it_when_pushed(make_store) -> None:
    store = make_store(capacity=1)
    store.put_group(make_group("a"))
    pattern = f"{store.keys.payload_prefix}*"
    result: list[str | None] = []
    thread = threading.Thread(target=lambda: result.append(store.put_group(make_group("b"))))
    thread.start()
    client = store.client
    for _ in range(200):  # until b's payload is written and waits for room
        if len(client.keys(pattern)) == 2:
            break
        threading.Event().wait(0.01)
    ttls = sorted(client.ttl(k) for k in client.keys(pattern))
    assert ttls[0] == -1 and ttls[1] > 0  # a's attached, b's waiting with a TTL
    store.take_groups("c", 1, block_ms=0)
    thread.join(10)
    assert result[0] is not None
    assert all(client.ttl(k) == -1 for k in client.keys(pattern))


def test_a_push_after_the_script_cache_was_flushed(make_store) -> None:
    store = make_store()
    store.put_group(make_group("a"))
    store.client.script_flush()
    assert store.put_groups([make_group("b"), make_group("c")])[0] is not None
    taken = store.take_groups("c", 3, block_ms=0)
    assert [t.group.prompt_id for t in taken] == ["a", "b", "c"]
    pattern = f"{store.keys.payload_prefix}*"
    assert all(store.client.ttl(k) == -1 for k in store.client.keys(pattern))


def test_a_writer_on_a_plain_redis_py_client_sends_a_plain_mset(redis_url, namespace) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keys.for_namespace(namespace)
    client.xgroup_create(keys.stream, "trainer", id="0", mkstream=True)
    writer = GroupWriter(client, keys, capacity=4, put_timeout_s=5, renew=lambda _: None)
    group = make_group("a", version=3)
    entry_id = writer.put_many([(group, None)], 60.0)[0]
    token = client.xrange(keys.stream)[0][1][b"r"].decode()
    assert entry_id is not None and client.get(keys.payload(token)) == encode_group(group)
    client.close()
