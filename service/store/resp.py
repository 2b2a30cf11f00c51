"""RESP2 encoding of the commands the Redis store sends (what redis-py's `pack_commands`
does, for the argument types we use, at a fraction of its cost).

redis-py's asyncio connection packs each argument through its `Encoder` (type checks,
`memoryview` handling, one bytes object per small command), which showed up as 14 % of a
small step's CPU in the server (cProfile of `Engine.step` on a 100-parameter session:
27,000 `pack_command` calls for 3,000 steps, 0.40 s of 2.8 s). Here every small
argument goes into one growing buffer and large values (over `INLINE_BYTES`) are passed
through as they are, uncopied, as redis-py does: the socket writes the list of buffers
with `writelines`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

#: values larger than this are sent as their own buffer instead of being copied
INLINE_BYTES = 1 << 16

Buffer = bytes | bytearray | memoryview


def _as_bytes(arg: Any) -> Buffer:
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):  # before int: a bool is an int
        raise TypeError("booleans have no Redis encoding; send 0/1 or a string")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    raise TypeError(f"cannot send a {type(arg).__name__} to Redis")


def pack_commands(commands: Iterable[Sequence[Any]]) -> list[Buffer]:
    """The RESP2 bytes of `commands` (each a sequence of bytes, str, int or float), as a
    list of buffers to write in order."""
    out: list[Buffer] = []
    buf = bytearray()
    for command in commands:
        buf += b"*%d\r\n" % len(command)
        for arg in command:
            kind = type(arg)  # the common exact types first; the rest (and errors) below
            if kind is str:
                data: Buffer = arg.encode()
            elif kind is bytes or kind is memoryview or kind is bytearray:
                data = arg
            elif kind is int:
                data = b"%d" % arg
            else:
                data = _as_bytes(arg)
            size = data.nbytes if type(data) is memoryview else len(data)
            if size > INLINE_BYTES:
                buf += b"$%d\r\n" % size
                out.append(bytes(buf))
                out.append(data)
                buf = bytearray(b"\r\n")
            else:
                # %b takes any buffer (memoryview too); typeshed says bytes only
                buf += b"$%d\r\n%b\r\n" % (size, data)  # type: ignore[str-format]
    if buf:
        out.append(bytes(buf))
    return out


__all__ = ["INLINE_BYTES", "pack_commands"]
