"""`sigwire serve --store` with a store it cannot use: one line, exit 1, no traceback."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sigwire.signing import Identity
from sigwire.store import SqliteStore
from tests.conftest import TIMEOUT


@contextlib.contextmanager
def _unusable(kind: str, path: Path) -> Iterator[str]:
    """Make ``path`` unusable as a store in the way ``kind`` names; what the error must say."""
    if kind == "directory":
        path.mkdir()
        yield "is a directory"
    elif kind == "text-file":
        path.write_text("this is not a database\n" * 200)
        yield "not a sigwire store, or a corrupt one"
    else:
        store = SqliteStore(path)  # this process holds it, as a running server would
        try:
            yield f"in use by process {os.getpid()}"
        finally:
            store.close()


@pytest.mark.parametrize("kind", ["directory", "text-file", "in-use"])
def test_serve_refuses_an_unusable_store_in_one_line(tmp_path: Path, kind: str) -> None:
    """A directory, a text file or a store in use: `sigwire: error: --store ...`, exit 1."""
    key, path = tmp_path / "server.pem", tmp_path / "agent.db"
    Identity.generate().save(key)
    command = ["serve", "--key", str(key), "--grpc", "127.0.0.1:0", "--store", str(path)]
    with _unusable(kind, path) as says:
        done = subprocess.run(
            [sys.executable, "-m", "sigwire", *command],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")},
            check=False,
        )
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"sigwire: error: --store {path}"), line
    assert says in line


def test_serve_refused_for_its_store_creates_no_identity(tmp_path: Path) -> None:
    """Without --key, a store that cannot be used refuses the command before any key is made."""
    path = tmp_path / "agent.db"
    path.mkdir()
    config = tmp_path / "config"
    done = subprocess.run(
        [sys.executable, "-m", "sigwire", "serve", "--grpc", "127.0.0.1:0", "--store", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "XDG_CONFIG_HOME": str(config), "SIGWIRE_KEY": ""},
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"sigwire: error: --store {path}"), done.stderr
    assert not config.exists()
