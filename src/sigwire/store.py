"""Durable state of a server: the push outbox and the reply cache, in SQLite.

With a store, what the server accepted survives a restart (even SIGKILL):
pushes still waiting for their agent are delivered when it reconnects, and a
request re-sent after the restart is answered from the cached reply instead
of running its handler again. Without one (the default), both live in memory.

SQLite runs in WAL mode with ``synchronous=NORMAL``: every write is committed
before the call returns, so it survives the process dying (not the machine
losing power, which would need ``FULL``). Writes are small and run inline.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

__all__ = ["SqliteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,        -- the pushed envelope's id
    did TEXT NOT NULL,          -- the agent it goes to
    seq INTEGER NOT NULL,       -- delivery order
    envelope BLOB NOT NULL,     -- the signed Envelope, serialized
    expires_ms INTEGER NOT NULL -- wall clock, Unix ms
);
CREATE INDEX IF NOT EXISTS outbox_by_did ON outbox (did, seq);
CREATE TABLE IF NOT EXISTS answers (
    sender TEXT NOT NULL,
    id TEXT NOT NULL,
    replies BLOB NOT NULL,      -- length-prefixed serialized Replies
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, id)
);
"""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _pack(items: list[bytes]) -> bytes:
    return b"".join(len(item).to_bytes(4, "big") + item for item in items)


def _unpack(blob: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(blob):
        size = int.from_bytes(blob[offset : offset + 4], "big")
        items.append(blob[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return items


class SqliteStore:
    """The outbox and reply cache of one server, in one SQLite file.

    Args:
        path: The database file; created (mode 0600) if absent.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Cached replies and pushes are application data: owner only.
            self.path.touch(mode=0o600)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.prune()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def prune(self) -> None:
        """Drop expired pushes and answers."""
        now = _now_ms()
        self._db.execute("DELETE FROM outbox WHERE expires_ms <= ?", (now,))
        self._db.execute("DELETE FROM answers WHERE expires_ms <= ?", (now,))

    # -- outbox --------------------------------------------------------------

    def add_push(self, did: str, envelope_id: str, envelope: bytes, expires_ms: int) -> None:
        """Record a push waiting for (or being delivered to) ``did``."""
        self._db.execute(
            "INSERT OR REPLACE INTO outbox (id, did, seq, envelope, expires_ms) VALUES "
            "(?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM outbox), ?, ?)",
            (envelope_id, did, envelope, expires_ms),
        )

    def remove_push(self, envelope_id: str) -> None:
        """Forget a push: answered, or expired."""
        self._db.execute("DELETE FROM outbox WHERE id = ?", (envelope_id,))

    def pending_pushes(self) -> list[tuple[str, bytes, int]]:
        """``(did, envelope, expires_ms)`` of every live push, in delivery order."""
        rows = self._db.execute(
            "SELECT did, envelope, expires_ms FROM outbox WHERE expires_ms > ? ORDER BY seq",
            (_now_ms(),),
        )
        return [(str(did), bytes(env), int(exp)) for did, env, exp in rows]

    # -- reply cache ----------------------------------------------------------

    def put_answer(self, sender: str, envelope_id: str, replies: list[bytes], ttl: float) -> None:
        """Keep the serialized replies to ``(sender, id)`` for ``ttl`` seconds."""
        self._db.execute(
            "INSERT OR REPLACE INTO answers (sender, id, replies, expires_ms) VALUES (?, ?, ?, ?)",
            (sender, envelope_id, _pack(replies), _now_ms() + int(ttl * 1000)),
        )

    def get_answer(self, sender: str, envelope_id: str) -> list[bytes] | None:
        """The serialized replies to ``(sender, id)``, if cached and live."""
        row = self._db.execute(
            "SELECT replies FROM answers WHERE sender = ? AND id = ? AND expires_ms > ?",
            (sender, envelope_id, _now_ms()),
        ).fetchone()
        return None if row is None else _unpack(bytes(row[0]))
