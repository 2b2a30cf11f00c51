"""Session stores: the StateStore protocol, Redis and in-process implementations."""

from service.store.base import (
    IdempotencyRecord,
    SessionBlobs,
    SessionMeta,
    SessionTx,
    StateStore,
    StoreUnavailable,
)

__all__ = [
    "IdempotencyRecord",
    "SessionBlobs",
    "SessionMeta",
    "SessionTx",
    "StateStore",
    "StoreUnavailable",
]
