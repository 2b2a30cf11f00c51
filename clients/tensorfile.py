"""The safetensors codec the clients use: `wire.tensorfile`, the one both the clients
and the server import (see `wire`). Re-exported here so that `clients.tensorfile`
stays the clients' public name for it."""

from __future__ import annotations

from wire.tensorfile import (
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_INT_DIGITS,
    TensorFileError,
    decode,
    encode,
)

__all__ = ["MAX_DIMS", "MAX_HEADER_BYTES", "MAX_INT_DIGITS", "TensorFileError", "decode", "encode"]
