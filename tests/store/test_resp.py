"""`service.store.resp.pack_commands` writes the bytes redis-py's packer writes."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from service.store.resp import INLINE_BYTES, pack_commands

COMMANDS = [
    ("WATCH", "optserve:{a}:meta"),
    ("HSET", "k", "json", b'{"x": 1}', "version", 7, "ttl", -1),
    ("SET", "optserve:{a}:params:0", memoryview(b"\x00\x01" * (INLINE_BYTES // 2 + 3)), "EX", 60),
    ("SET", "small", memoryview(b"abc"), "EX", 60),
    ("LPUSH", "h", b""),
    ("LTRIM", "h", 0, 999),
    ("ZADD", "z", 1.5e9 + 0.25, "member"),
    ("GET", "caf\u00e9"),
]


def _redis_py(commands: list[tuple[object, ...]]) -> bytes:
    conn = Connection()
    return b"".join(bytes(part) for part in conn.pack_commands(commands))


@pytest.mark.parametrize("upto", range(1, len(COMMANDS) + 1))
def test_same_bytes_as_redis_py(upto: int) -> None:
    commands = COMMANDS[:upto]
    ours = b"".join(bytes(part) for part in pack_commands(commands))
    assert ours == _redis_py(commands)


def test_large_values_are_not_copied() -> None:
    blob = memoryview(bytearray(INLINE_BYTES + 1))
    parts = pack_commands([("SET", "k", blob)])
    assert any(part is blob for part in parts)


@pytest.mark.parametrize("bad", [True, None, object()])
def test_unknown_argument_types_are_refused(bad: object) -> None:
    with pytest.raises(TypeError):
        pack_commands([("SET", "k", bad)])
