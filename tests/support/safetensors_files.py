"""Safetensors files built and edited byte by byte, for tests that send malformed or
edited ones (hostile bodies, edited state files)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any


def st_file(
    header: Mapping[str, Any] | str | bytes, data: bytes, length: int | None = None
) -> bytes:
    """A safetensors file: the 8-byte header length (`length`, or the header's own), the
    header (a dict as JSON, or text / bytes as given) and `data`."""
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = json.dumps(header).encode()
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def split_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A file's header (JSON, `__metadata__` included) and its data bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + n])
    return header, data[8 + n :]


def with_meta(data: bytes, **values: str | None) -> bytes:
    """The file with metadata strings replaced (None: removed); tensors byte for byte."""
    header, body = split_file(data)
    meta = header.setdefault("__metadata__", {})
    for key, value in values.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return st_file(header, body)
