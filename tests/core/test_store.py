"""The SQLite store: bounded tables pruned while running, one process per file, clear errors."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sigwire
from sigwire.dispatch import Answer, Dispatcher, Handlers, Limits
from sigwire.envelope import Envelope, now_ms
from sigwire.errors import OverloadedError, ReplayError, StaleMessageError, StoreError
from sigwire.store import SCHEMA_VERSION, SqliteStore
from tests.conftest import TIMEOUT

CLIENT = sigwire.Identity.from_seed(b"c" * 32)
SERVER = sigwire.Identity.from_seed(b"s" * 32)

# The schema sigwire wrote before answers kept what was asked (user_version 0).
_SCHEMA_1 = """
CREATE TABLE outbox (id TEXT PRIMARY KEY, did TEXT NOT NULL, seq INTEGER NOT NULL,
    envelope BLOB NOT NULL, expires_ms INTEGER NOT NULL);
CREATE INDEX outbox_by_did ON outbox (did, seq);
CREATE TABLE answers (sender TEXT NOT NULL, id TEXT NOT NULL, replies BLOB NOT NULL,
    expires_ms INTEGER NOT NULL, PRIMARY KEY (sender, id));
"""


@contextlib.contextmanager
def opened(path: Path, **limits: int) -> Iterator[SqliteStore]:
    store = SqliteStore(path, **limits)
    try:
        yield store
    finally:
        store.close()


def rows(path: Path, table: str) -> int:
    """Rows of ``table``, read by a connection of its own (as an operator would)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_expired_rows_are_pruned_while_the_store_is_in_use(tmp_path: Path) -> None:
    """Expired answers, pushes and hellos go as later writes come, not only at open or stop."""
    path = tmp_path / "agent.db"
    with opened(path) as store:
        past = now_ms() - 1
        for i in range(500):
            store.put_answer("did:key:a", f"old {i}", [b"x"], ttl=0)
            store.add_push("did:key:a", f"old {i}", b"e", past)
        for i in range(200):
            store.put_answer("did:key:a", f"new {i}", [b"x"], ttl=600)
        assert rows(path, "answers") < 500
        assert rows(path, "outbox") < 500
        for i in range(400):
            store.put_answer("did:key:a", f"newer {i}", [b"x"], ttl=600)
        assert rows(path, "answers") == 600
        assert rows(path, "outbox") == 0


def test_answers_beyond_the_caps_evict_the_oldest(tmp_path: Path) -> None:
    """Past max_answers or max_answer_bytes, the oldest answers go; the newest stay."""
    path = tmp_path / "agent.db"
    with opened(path, max_answers=10, max_answer_bytes=10_000) as store:
        for i in range(25):
            store.put_answer("did:key:a", str(i), [b"x" * 100], ttl=60 + i)
        assert rows(path, "answers") == 10
        assert store.get_answer("did:key:a", "14") is None
        assert store.get_answer("did:key:a", "15") is not None
        for i in range(25, 30):
            store.put_answer("did:key:a", str(i), [b"x" * 4000], ttl=60 + i)
        assert rows(path, "answers") == 2
        assert store.get_answer("did:key:a", "29") is not None
    with opened(path, max_answers=1) as store:  # a smaller cap at the next open
        assert rows(path, "answers") == 1
        assert store.get_answer("did:key:a", "29") is not None


def test_a_full_outbox_refuses_the_next_push_until_one_expires_or_goes(tmp_path: Path) -> None:
    """Past max_pushes, add_push raises OVERLOADED; nothing already accepted is dropped."""
    path = tmp_path / "agent.db"
    with opened(path, max_pushes=3) as store:
        for i in range(3):
            store.add_push("did:key:a", str(i), b"e", now_ms() + 60_000)
        with pytest.raises(OverloadedError, match="outbox is full"):
            store.add_push("did:key:a", "3", b"e", now_ms() + 60_000)
        assert [env for _, env, _ in store.pending_pushes()] == [b"e"] * 3
        store.remove_push("0")
        store.add_push("did:key:a", "3", b"e", now_ms() + 60_000)
        assert rows(path, "outbox") == 3


async def test_a_server_with_a_full_store_outbox_refuses_the_push(tmp_path: Path) -> None:
    """Server.push on a full store fails OVERLOADED and leaves nothing queued."""
    store = SqliteStore(tmp_path / "agent.db", max_pushes=1)
    server = sigwire.Server(SERVER, memory=f"full-outbox-{os.getpid()}", store=store)
    async with server:
        absent = sigwire.Identity.generate().did
        store.add_push(absent, "taken", b"e", now_ms() + 60_000)
        with pytest.raises(OverloadedError):
            await server.push(absent, "ask", timeout=TIMEOUT)
        assert server._outboxes == {}
        assert server.correlator.pending() == []
    store.close()


def test_a_second_store_on_the_same_file_is_refused(tmp_path: Path) -> None:
    """Two stores open on one file: the second raises StoreError naming the holder."""
    path = tmp_path / "agent.db"
    with opened(path):
        with pytest.raises(StoreError, match=f"in use by process {os.getpid()}"):
            SqliteStore(path)
    with opened(path):  # released at close
        pass


def test_a_second_server_on_the_same_store_is_refused(tmp_path: Path) -> None:
    """Server(store=PATH) twice on one file: the second construction raises StoreError."""
    path = tmp_path / "agent.db"
    first = sigwire.Server(SERVER, memory="a", store=path)
    with pytest.raises(StoreError, match="run one server per store"):
        sigwire.Server(SERVER, memory="b", store=path)
    assert first.store is not None
    first.store.close()


def test_the_lock_dies_with_a_killed_process(tmp_path: Path) -> None:
    """A store held by a process killed with SIGKILL opens at once afterwards."""
    path = tmp_path / "agent.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, sigwire.store as s; x = s.SqliteStore(sys.argv[1]); "
            "print('open', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(StoreError, match=f"in use by process {holder.pid}"):
            SqliteStore(path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=TIMEOUT)
        assert holder.stdin is not None
        assert holder.stdout is not None
        holder.stdin.close()
        holder.stdout.close()
    with opened(path):
        pass


def _corrupt(path: Path) -> None:
    with opened(path) as store:
        for i in range(50):
            store.put_answer("did:key:a", str(i), [b"x" * 1000], ttl=600)
    data = bytearray(path.read_bytes())
    data[100:] = b"\xa5" * (len(data) - 100)  # a valid header, garbage pages
    path.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _newer(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("name,value\n" * 100), "not a sigwire store, or a corrupt one"),
        (_corrupt, "not a sigwire store, or a corrupt one"),
        (_newer, "written by a newer sigwire"),
    ],
    ids=["directory", "text-file", "corrupt-sqlite", "newer-schema"],
)
def test_an_unusable_store_path_raises_a_store_error(
    tmp_path: Path, make: object, says: str
) -> None:
    """Each unusable --store path is one StoreError with a readable message, nothing else."""
    path = tmp_path / "agent.db"
    make(path)  # type: ignore[operator]
    with pytest.raises(StoreError) as info:
        SqliteStore(path)
    assert says in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None


def _request(payload: bytes, id: str | None = None) -> Envelope:
    return CLIENT.sign_envelope(Envelope.new("work", payload, sender=CLIENT.did, id=id))


def _counting() -> tuple[Handlers, list[bytes]]:
    handlers, runs = Handlers(), []

    @handlers.on("work")
    async def work(msg: sigwire.Message) -> bytes:
        runs.append(msg.payload)
        return b"done " + msg.payload

    return handlers, runs


async def test_a_store_of_the_previous_schema_is_migrated(tmp_path: Path) -> None:
    """Its answers stay; not knowing what was asked, they answer an exact re-send only."""
    path = tmp_path / "agent.db"
    handlers, runs = _counting()
    request = _request(b"pay 10")
    with opened(path) as store:  # answered, then written back as schema 1 wrote it
        assert isinstance(Dispatcher(SERVER, handlers, store=store).begin(request), Answer)
        (blob,) = store._db.execute("SELECT replies FROM answers").fetchone()
    path.unlink()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(_SCHEMA_1)
        db.execute(
            "INSERT INTO answers VALUES (?, ?, ?, ?)",
            (CLIENT.did, request.id, blob, now_ms() + 600_000),
        )
        db.commit()
    with opened(path) as store:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        restarted = Dispatcher(SERVER, handlers, limits=Limits(rate=None), store=store)
        again = restarted.begin(request)
        assert isinstance(again, Answer)
        assert [r.data for r in again.replies] == [b"done pay 10"]
        retry = CLIENT.sign_envelope(request.renewed())
        with pytest.raises(ReplayError, match="only an exact re-send"):
            restarted.begin(retry)
    assert runs == [b"pay 10"]


def test_hellos_past_the_cap_forget_the_oldest_and_raise_the_floor(tmp_path: Path) -> None:
    """A full hello table forgets its oldest; hellos no newer than it are refused from then on."""
    with opened(tmp_path / "agent.db", max_hellos=2) as store:
        base, expires = store.hello_floor_ms, now_ms() + 600_000
        with pytest.raises(StaleMessageError):  # made before the store knew of any
            store.add_hello(b"z" * 32, base, expires, keep_ms=0)
        assert store.add_hello(b"a" * 32, base + 1, expires, keep_ms=0)
        assert store.add_hello(b"b" * 32, base + 2, expires, keep_ms=0)
        assert not store.add_hello(b"a" * 32, base + 1, expires, keep_ms=0)
        assert store.add_hello(b"c" * 32, base + 3, expires, keep_ms=0)
        assert store.hello_floor_ms == base + 1
        with pytest.raises(StaleMessageError):  # forgotten, so refused rather than new again
            store.add_hello(b"a" * 32, base + 1, expires, keep_ms=0)
        with pytest.raises(OverloadedError):  # none old enough to forget
            store.add_hello(b"d" * 32, base + 4, expires, keep_ms=60_000)
        assert store.hello_floor_ms == base + 1
