"""Redis key names of the session store.

Every key of one session starts with `<prefix>:{<session id>}:`, so all of them share
the Redis Cluster hash tag `{<session id>}` and live in one slot: a commit touches one
slot only and works unchanged on a cluster. (Redis hashes the text between the first
`{` and the next `}`; whatever the id holds, every key of a session starts with the
same text, hence has the same tag.)

    <p>:{<id>}:meta              hash: the meta JSON, version, blob sizes, chunk counts, ttl
    <p>:{<id>}:params:<i>        string: chunk i of the params blob
    <p>:{<id>}:state:<i>         string: chunk i of the state blob
    <p>:{<id>}:idem:<key>        string: an idempotency record (its own ttl)
    <p>:{<id>}:idem:<key>:lock   string: an in-flight claim of <key> (its own ttl)
    <p>:{<id>}:idems             sorted set: idempotency keys recorded, scored by expiry
    <p>:{<id>}:history           list: history entries, newest first, trimmed at commit
    <p>:sessions                 sorted set: session ids, scored by (last known) expiry
    <p>:tenant:<t>:sessions      sorted set: ids of tenant <t>'s sessions, scored by
                                 creation time (<t> percent-encoded, `{` and `}` too)

Idempotency keys come from clients: they are percent-encoded (`:` and `%` included), so
a key ending in `:lock` cannot name another key's claim.
"""

from __future__ import annotations

from urllib.parse import quote

DEFAULT_PREFIX = "optserve"


class Keys:
    """Key names under one prefix (tests use a private prefix per run)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"bad key prefix {prefix!r}")
        self.prefix = prefix

    def session(self, session_id: str) -> str:
        """The common start of every key of `session_id` (for SCAN MATCH in tests)."""
        return f"{self.prefix}:{{{session_id}}}:"

    def meta(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:meta"

    def params(self, session_id: str, index: int) -> str:
        return f"{self.prefix}:{{{session_id}}}:params:{index}"

    def state(self, session_id: str, index: int) -> str:
        return f"{self.prefix}:{{{session_id}}}:state:{index}"

    def idem(self, session_id: str, key: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:idem:{quote(key, safe='')}"

    def idem_lock(self, session_id: str, key: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:idem:{quote(key, safe='')}:lock"

    def idem_index(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:idems"

    def history(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:history"

    def sessions(self) -> str:
        return f"{self.prefix}:sessions"

    def tenant_sessions(self, tenant: str) -> str:
        """The index of `tenant`'s sessions (outside every session's slot; the tenant is
        percent-encoded, so it has no hash tag and cannot collide with another key)."""
        return f"{self.prefix}:tenant:{quote(tenant, safe='')}:sessions"
