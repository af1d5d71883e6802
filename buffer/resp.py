"""How the store's redis-py connections pack commands: a cheaper packer, and prepacked SETs.

redis-py's default packer runs Python per argument (an isinstance chain and an encode call)
and then has hiredis copy every argument, the ~28 KB records included, into one command.
For the store's hot commands, whose arguments are bytes, str or int, `FastPacker` hands
the whole tuple to hiredis at once: the same bytes on the wire, several us less per group
(the PUSH script alone takes six arguments per group). Anything else (floats, memoryviews,
command names with spaces) goes to redis-py's own packer, unchanged.

`pair_frame` gives the RESP framing of a key-value pair of an MSET, so the codec can join it
around a record in the one copy it makes anyway (codec.encode_group_versioned's `frame`);
the command is then queued as `(PREPACKED, command_head(b"MSET", 2n), *pairs)` and sent as
it is, instead of being copied again.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

# the first argument of a command that is already packed: (PREPACKED, resp_bytes). Its reply
# is parsed raw (no redis-py response callback is registered under this name).
PREPACKED = b"PHYSARUM-PREPACKED"

_PLAIN = frozenset({bytes, str, int})  # what hiredis packs exactly as redis-py would
_BUFFER_CUTOFF = 6000  # redis-py's default: larger values are sent unjoined by its packer


class FastPacker:
    """A redis-py command packer (the `command_packer` connection argument); stateless, so
    one instance serves every connection of a pool."""

    def __init__(self) -> None:
        encode = Encoder("utf-8", "strict", False).encode  # redis-py's defaults
        self._fallback = HiredisRespSerializer(
            PythonRespSerializer(_BUFFER_CUTOFF, encode).pack, encode
        )

    def pack(self, *args: Any) -> list[bytes]:
        first = args[0]
        if first is PREPACKED:
            return list(args[1:])
        # bool is not in _PLAIN (redis-py refuses it), type() is exact; a command name with
        # a space ("CONFIG GET") is split by redis-py's packer
        space = _SPACE.get(type(first))
        if space is not None and space not in first and _PLAIN.issuperset(map(type, args)):
            return [hiredis.pack_command(args)]
        return self._fallback.pack(*args)


_SPACE = {bytes: b" ", str: " "}  # by the type of the command name


def command_head(name: bytes, n_args: int) -> bytes:
    """The RESP bytes that open `name` with n_args arguments (then each argument's own)."""
    return b"*%d\r\n$%d\r\n%s\r\n" % (n_args + 1, len(name), name)


def pair_frame(key: bytes, size: int) -> tuple[bytes, bytes]:
    """The RESP bytes before and after a `size`-byte value in a key-value argument pair."""
    return b"$%d\r\n%s\r\n$%d\r\n" % (len(key), key, size), b"\r\n"
