"""Durable state of a server: the push outbox, the reply cache and hellos seen, in SQLite.

With a store, what the server accepted survives a restart (even SIGKILL):
pushes still waiting for their agent are delivered when it reconnects, and a
request re-sent after the restart is answered from the cached reply instead
of running its handler again. Without one (the default), both live in memory.

SQLite runs in WAL mode with ``synchronous=NORMAL``: every write is committed
before the call returns, so it survives the process dying (not the machine
losing power, which would need ``FULL``). Writes are small and run inline.

Every table is bounded. Expired rows are deleted at open, at stop, and while
running: every ``_PRUNE_EVERY`` writes delete up to ``_PRUNE_BATCH`` expired
rows of each table, so deletion keeps ahead of insertion at any write rate
and no single write pays for more than one batch. At its cap, the answers
table forgets its oldest answers (they are a cache: refusing new ones would
let any sender lock everyone out by filling it); the outbox refuses new
pushes with :class:`~sigwire.errors.OverloadedError` (a push is a message the
application handed over: dropping an accepted one would lose it silently);
the hellos table forgets its oldest hello and refuses hellos created at or
before it from then on (its *floor*, as the replay guard does).

One process at a time: the store takes an exclusive ``flock`` on
``PATH.lock`` for as long as it is open. The kernel releases it when the
process ends, however it ends (SIGKILL included), so a crashed server never
leaves a stale lock; a second server on the same file gets a
:class:`~sigwire.errors.StoreError` saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
import weakref
from pathlib import Path

from sigwire.errors import OverloadedError, StaleMessageError, StoreError

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

#: ``PRAGMA user_version`` of the schema this version writes. Version 1 (no
#: ``user_version`` set) had no ``asked`` column and no ``hellos`` table; it is
#: migrated in place on open: its answers keep ``asked`` NULL (then only an
#: exact re-send of the request is answered from them).
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,        -- the pushed envelope's id
    did TEXT NOT NULL,          -- the agent it goes to
    seq INTEGER NOT NULL,       -- delivery order
    envelope BLOB NOT NULL,     -- the signed Envelope, serialized
    expires_ms INTEGER NOT NULL -- wall clock, Unix ms
);
CREATE INDEX IF NOT EXISTS outbox_by_did ON outbox (did, seq);
CREATE INDEX IF NOT EXISTS outbox_by_expiry ON outbox (expires_ms);
CREATE TABLE IF NOT EXISTS answers (
    sender TEXT NOT NULL,
    id TEXT NOT NULL,
    replies BLOB NOT NULL,      -- length-prefixed serialized Replies
    expires_ms INTEGER NOT NULL,
    asked BLOB,                 -- digest of what was asked; NULL: unknown (schema 1)
    PRIMARY KEY (sender, id)
);
CREATE INDEX IF NOT EXISTS answers_by_expiry ON answers (expires_ms);
CREATE TABLE IF NOT EXISTS hellos (
    key BLOB PRIMARY KEY,       -- digest of the hello's (sender, nonce)
    created_ms INTEGER NOT NULL,-- the hello's own timestamp
    expires_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS hellos_by_expiry ON hellos (expires_ms);
CREATE INDEX IF NOT EXISTS hellos_by_created ON hellos (created_ms);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

# Amortised pruning: every _PRUNE_EVERY writes, up to _PRUNE_BATCH expired
# rows per table go (four times the rows written in between, at most).
_PRUNE_EVERY = 64
_PRUNE_BATCH = 256

# Hellos created at or before this (Unix ms) are refused: set when the hellos
# table is created (no earlier hello is recorded) and raised when one is forgotten.
_HELLO_FLOOR = "hello_floor_ms"


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
    """The outbox, reply cache and hellos seen of one server, in one SQLite file.

    Args:
        path: The database file; created (mode 0600) if absent.
        max_answers: Most answers kept; past it, the oldest are forgotten.
        max_answer_bytes: Most bytes of serialized replies kept, likewise.
        max_pushes: Most pushes waiting; past it, :meth:`add_push` refuses.
        max_hellos: Most hellos remembered; past it, the oldest is forgotten
            and the hello floor rises to it.

    Raises:
        StoreError: The path is a directory, not a SQLite database, a corrupt
            one, written by a newer sigwire, or open in another process.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_answers: int = 200_000,
        max_answer_bytes: int = 1024 * 1024 * 1024,
        max_pushes: int = 100_000,
        max_hellos: int = 1_000_000,
    ) -> None:
        if min(max_answers, max_answer_bytes, max_pushes, max_hellos) < 1:
            raise ValueError("every store limit must be positive")
        self.path = Path(path)
        self.max_answers = max_answers
        self.max_answer_bytes = max_answer_bytes
        self.max_pushes = max_pushes
        self.max_hellos = max_hellos
        if self.path.is_dir():
            raise StoreError(str(self.path), "is a directory; give the path of a database file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = _lock(self.path)
        except OSError as exc:
            raise StoreError(str(self.path), exc.strerror or str(exc)) from None
        # The lock goes with the store: at close(), or when it is collected unclosed.
        self._unlock = weakref.finalize(self, os.close, lock)
        try:
            if not self.path.exists():
                # Cached replies and pushes are application data: owner only.
                self.path.touch(mode=0o600)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
        except (OSError, sqlite3.Error) as exc:
            self._unlock()
            raise StoreError(str(self.path), str(exc)) from None
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StoreError(str(self.path), _explain(exc)) from None
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {version}, written by a newer sigwire (this one "
                f"reads up to {SCHEMA_VERSION})"
            )
        # Each step is idempotent: a migration cut short is finished at the next open.
        columns = {row[1] for row in db.execute("PRAGMA table_info(answers)")}
        if columns and "asked" not in columns:
            db.execute("ALTER TABLE answers ADD COLUMN asked BLOB")
        db.executescript(_SCHEMA)
        db.execute(
            "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)", (_HELLO_FLOOR, _now_ms() - 1)
        )
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.hello_floor_ms: int = db.execute(
            "SELECT value FROM meta WHERE name = ?", (_HELLO_FLOOR,)
        ).fetchone()[0]
        self._writes = 0
        # Counted here (each table read, so a damaged file fails now rather
        # than mid-request), then kept up to date by every write: one writer.
        self.prune()
        self._evict_answers()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the lock is then released)."""
        return not self._unlock.alive

    def close(self) -> None:
        """Close the database and release the lock."""
        with contextlib.suppress(AttributeError):
            self._db.close()
        self._unlock()

    def prune(self) -> None:
        """Drop every expired push, answer and hello."""
        now = _now_ms()
        self._db.execute("DELETE FROM outbox WHERE expires_ms <= ?", (now,))
        self._db.execute("DELETE FROM answers WHERE expires_ms <= ?", (now,))
        self._db.execute("DELETE FROM hellos WHERE expires_ms <= ?", (now,))
        self._recount()

    def _recount(self) -> None:
        db = self._db
        self._answers, self._answer_bytes = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(replies)), 0) FROM answers"
        ).fetchone()
        self._pushes = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self._hellos = db.execute("SELECT COUNT(*) FROM hellos").fetchone()[0]

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes % _PRUNE_EVERY == 0:
            self._prune_some(_now_ms())

    def _prune_some(self, now: int) -> None:
        # At most _PRUNE_BATCH expired rows per table, oldest first (by index).
        db = self._db
        rows = db.execute(
            "SELECT rowid, LENGTH(replies) FROM answers WHERE expires_ms <= ? "
            "ORDER BY expires_ms LIMIT ?",
            (now, _PRUNE_BATCH),
        ).fetchall()
        self._delete_answers(rows)
        self._pushes -= db.execute(
            "DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox "
            "WHERE expires_ms <= ? ORDER BY expires_ms LIMIT ?)",
            (now, _PRUNE_BATCH),
        ).rowcount
        self._hellos -= db.execute(
            "DELETE FROM hellos WHERE rowid IN (SELECT rowid FROM hellos "
            "WHERE expires_ms <= ? ORDER BY expires_ms LIMIT ?)",
            (now, _PRUNE_BATCH),
        ).rowcount

    def _delete_answers(self, rows: list[tuple[int, int]]) -> None:
        if rows:
            self._db.executemany("DELETE FROM answers WHERE rowid = ?", [(r,) for r, _ in rows])
            self._answers -= len(rows)
            self._answer_bytes -= sum(size for _, size in rows)

    # -- outbox --------------------------------------------------------------

    def add_push(self, did: str, envelope_id: str, envelope: bytes, expires_ms: int) -> None:
        """Record a push waiting for (or being delivered to) ``did``.

        Raises:
            OverloadedError: ``max_pushes`` pushes are waiting already.
        """
        if self._pushes >= self.max_pushes:
            self._prune_some(_now_ms())
            if self._pushes >= self.max_pushes:
                raise OverloadedError(
                    f"the store's outbox is full ({self.max_pushes} pushes waiting)",
                    details={"did": did},
                )
        added = self._db.execute(
            "INSERT OR IGNORE INTO outbox (id, did, seq, envelope, expires_ms) VALUES "
            "(?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM outbox), ?, ?)",
            (envelope_id, did, envelope, expires_ms),
        ).rowcount
        if added:
            self._pushes += 1
        else:
            self._db.execute(
                "UPDATE outbox SET did = ?, envelope = ?, expires_ms = ? WHERE id = ?",
                (did, envelope, expires_ms, envelope_id),
            )
        self._wrote()

    def remove_push(self, envelope_id: str) -> None:
        """Forget a push: answered, or expired."""
        self._pushes -= self._db.execute("DELETE FROM outbox WHERE id = ?", (envelope_id,)).rowcount

    def pending_pushes(self) -> list[tuple[str, bytes, int]]:
        """``(did, envelope, expires_ms)`` of every live push, in delivery order."""
        rows = self._db.execute(
            "SELECT did, envelope, expires_ms FROM outbox WHERE expires_ms > ? ORDER BY seq",
            (_now_ms(),),
        )
        return [(str(did), bytes(env), int(exp)) for did, env, exp in rows]

    # -- reply cache ----------------------------------------------------------

    def put_answer(
        self,
        sender: str,
        envelope_id: str,
        replies: list[bytes],
        ttl: float,
        asked: bytes | None = None,
    ) -> None:
        """Keep the serialized replies to ``(sender, id)`` for ``ttl`` seconds.

        ``asked``: a digest of what the request asked, given back by
        :meth:`get_answer` so that the answer is never served for another
        request under the same id.
        Past ``max_answers`` or ``max_answer_bytes``, the oldest answers go.
        """
        blob = _pack(replies)
        if len(blob) > self.max_answer_bytes:
            return  # it would evict every other answer, then itself
        row = (sender, envelope_id, blob, _now_ms() + int(ttl * 1000), asked)
        db = self._db
        if not db.execute(
            "INSERT OR IGNORE INTO answers (sender, id, replies, expires_ms, asked) "
            "VALUES (?, ?, ?, ?, ?)",
            row,
        ).rowcount:
            # Only an expired answer can be there (a live one is served, not
            # recomputed): replaced.
            (old,) = db.execute(
                "SELECT LENGTH(replies) FROM answers WHERE sender = ? AND id = ?",
                (sender, envelope_id),
            ).fetchone()
            db.execute(
                "UPDATE answers SET replies = ?, expires_ms = ?, asked = ? "
                "WHERE sender = ? AND id = ?",
                (*row[2:], sender, envelope_id),
            )
            self._answer_bytes -= old
            self._answers -= 1
        self._answers += 1
        self._answer_bytes += len(blob)
        self._evict_answers()
        self._wrote()

    def _evict_answers(self) -> None:
        # Oldest first (soonest to expire), until within both caps; no more
        # than that, and in batches, however many small answers a big one displaces.
        while self._answers > self.max_answers or self._answer_bytes > self.max_answer_bytes:
            rows = self._db.execute(
                "SELECT rowid, LENGTH(replies) FROM answers ORDER BY expires_ms LIMIT ?",
                (_PRUNE_BATCH,),
            ).fetchall()
            if not rows:
                self._recount()
                return
            count = self._answers - self.max_answers
            size = self._answer_bytes - self.max_answer_bytes
            doomed = []
            for row in rows:
                if count <= 0 and size <= 0:
                    break
                doomed.append(row)
                count -= 1
                size -= row[1]
            self._delete_answers(doomed)

    def get_answer(self, sender: str, envelope_id: str) -> tuple[bytes | None, list[bytes]] | None:
        """``(asked, replies)`` of the answer to ``(sender, id)``, if cached and live.

        ``asked`` is the digest given to :meth:`put_answer`, or None if unknown.
        """
        row = self._db.execute(
            "SELECT asked, replies FROM answers WHERE sender = ? AND id = ? AND expires_ms > ?",
            (sender, envelope_id, _now_ms()),
        ).fetchone()
        if row is None:
            return None
        return (None if row[0] is None else bytes(row[0])), _unpack(bytes(row[1]))

    # -- hellos --------------------------------------------------------------

    def add_hello(self, key: bytes, created_ms: int, expires_ms: int, *, keep_ms: int) -> bool:
        """Record a hello; False if it was recorded before (a replay).

        Args:
            key: A digest of the hello's sender and nonce.
            created_ms: The hello's own timestamp.
            expires_ms: When it may be forgotten (the replay guard's TTL).
            keep_ms: A hello created less than this long ago is never forgotten
                to make room (the replay window's ``future_ms``): the floor
                stays that far behind the clock.

        Raises:
            StaleMessageError: ``created_ms`` is at or before the hello floor.
            OverloadedError: ``max_hellos`` hellos, none older than ``keep_ms``.
        """
        now = _now_ms()
        if created_ms <= self.hello_floor_ms:
            raise StaleMessageError(created_ms - now, floor_ms=self.hello_floor_ms)
        db = self._db
        if db.execute(
            "SELECT 1 FROM hellos WHERE key = ? AND expires_ms > ?", (key, now)
        ).fetchone():
            return False
        if self._hellos >= self.max_hellos:
            self._prune_some(now)
        if self._hellos >= self.max_hellos:
            oldest = db.execute(
                "SELECT rowid, created_ms FROM hellos ORDER BY created_ms LIMIT 1"
            ).fetchone()
            if oldest[1] > now - keep_ms:
                raise OverloadedError(
                    f"the store remembers {self.max_hellos} hellos, none older than "
                    f"{keep_ms} ms; try again shortly"
                )
            db.execute("DELETE FROM hellos WHERE rowid = ?", (oldest[0],))
            self._hellos -= 1
            if oldest[1] > self.hello_floor_ms:
                self.hello_floor_ms = oldest[1]
                db.execute("UPDATE meta SET value = ? WHERE name = ?", (oldest[1], _HELLO_FLOOR))
            if created_ms <= self.hello_floor_ms:
                raise StaleMessageError(created_ms - now, floor_ms=self.hello_floor_ms)
        db.execute(
            "INSERT OR REPLACE INTO hellos (key, created_ms, expires_ms) VALUES (?, ?, ?)",
            (key, created_ms, expires_ms),
        )
        self._hellos += 1
        self._wrote()
        return True


def _lock(path: Path) -> int:
    """An open descriptor holding the exclusive lock of the store at ``path``."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise StoreError(
            str(path),
            f"in use by {who} (its lock is {lock_path}); run one server per store",
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _explain(exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return f"not a sigwire store, or a corrupt one ({text}); move it away or give another path"
    return text
