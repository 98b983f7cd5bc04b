"""The sigwire command against a real `sigwire serve` process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sigwire import cli
from sigwire.signing import Identity
from tests.conftest import TIMEOUT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sigwire(
    *args: str, env: dict[str, str], timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sigwire", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@contextlib.contextmanager
def _serving(
    key: Path, *args: str, env: dict[str, str], stderr: int = subprocess.DEVNULL
) -> Iterator[subprocess.Popen[str]]:
    """A `sigwire serve --key KEY ARGS...` process, killed if still running at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigwire", "serve", "--key", str(key), *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}


@pytest.fixture(params=["uvloop", "asyncio"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path, env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    key = tmp_path / "server.pem"
    identity = Identity.generate()
    identity.save(key)
    port = _free_port()
    with _serving(
        key,
        "--grpc",
        f"127.0.0.1:{port}",
        "--loop",
        request.param,
        env=env,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == f"sigwire agent {identity.did}", first
        url = proc.stdout.readline().split()[-1]
        yield proc, url, identity.did


def test_send_ping_describe_and_drain_on_sigterm(
    served: tuple[subprocess.Popen[str], str, str], env: dict[str, str]
) -> None:
    """send, --stream, ping and describe work against `sigwire serve`, which exits 0 on SIGTERM."""
    proc, url, did = served
    sent = _sigwire("send", url, "echo", "--data", "hello", "--expect-did", did, env=env)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == "hello"

    streamed = _sigwire("send", url, "count", "--data", "3", "--stream", env=env)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.split() == ["0", "1", "2"]

    ping = _sigwire("ping", url, "--count", "2", env=env)
    assert ping.returncode == 0, ping.stderr
    assert "SERVING" in ping.stdout
    assert "rtt" in ping.stdout

    described = _sigwire("describe", url, env=env)
    assert described.returncode == 0, described.stderr
    card = json.loads(described.stdout)
    assert card["did"] == did
    assert card["endpoints"] == [url]
    assert card["kinds"] == ["count", "echo"]

    unknown = _sigwire("send", url, "no.such.kind", env=env)
    assert unknown.returncode == 1
    assert "KIND_UNKNOWN" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0
    assert proc.stderr is not None
    assert "draining" in proc.stderr.read()


def test_send_to_a_dead_port_fails_cleanly(env: dict[str, str]) -> None:
    """send to a port nobody listens on exits 1 with a reason, no traceback."""
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        result = _sigwire(
            "send", f"grpc://127.0.0.1:{port}", "echo", "--connect-timeout", "0.5", env=env
        )
    assert result.returncode == 1
    assert "no transport available" in result.stderr
    assert "Traceback" not in result.stderr


def test_send_refuses_an_unknown_scheme(env: dict[str, str]) -> None:
    """An unsupported URL scheme is named, with the supported ones listed."""
    result = _sigwire("send", "ftp://127.0.0.1:1", "echo", env=env)
    assert result.returncode == 1
    assert "grpc://" in result.stderr
    assert "ftp" in result.stderr


def test_serve_ws_and_send_falls_back_to_it(tmp_path: Path, env: dict[str, str]) -> None:
    """serve --ws opens both listeners; send --fallback reaches ws:// when gRPC is dead."""
    key = tmp_path / "server.pem"
    Identity.generate().save(key)
    grpc_port, ws_port = _free_port(), _free_port()
    listen = ("--grpc", f"127.0.0.1:{grpc_port}", "--ws", f"127.0.0.1:{ws_port}")
    with _serving(key, *listen, env=env) as proc:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        ws_url = f"ws://127.0.0.1:{ws_port}/sigwire/v1"
        assert lines[1:] == [
            f"listening on grpc://127.0.0.1:{grpc_port}",
            f"listening on {ws_url}",
        ]
        with socket.socket() as dead:
            dead.bind(("127.0.0.1", 0))
            dead_url = f"grpc://127.0.0.1:{dead.getsockname()[1]}"
            sent = _sigwire(
                "send", dead_url, "echo", "--data", "via ws", "--fallback", ws_url,
                "--connect-timeout", "1", env=env,
            )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout == "via ws"
        ping = _sigwire("ping", ws_url, "--count", "2", env=env)
        assert ping.returncode == 0, ping.stderr
        assert "SERVING" in ping.stdout
        described = _sigwire("describe", ws_url, env=env)
        assert described.returncode == 0, described.stderr
        assert json.loads(described.stdout)["endpoints"] == [
            f"grpc://127.0.0.1:{grpc_port}",
            ws_url,
        ]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0


def test_serve_store_keeps_answers_in_sqlite(tmp_path: Path, env: dict[str, str]) -> None:
    """serve --store writes the reply cache to the SQLite file it names."""
    import sqlite3

    key, store = tmp_path / "server.pem", tmp_path / "agent.db"
    Identity.generate().save(key)
    port = _free_port()
    listen = ("--grpc", f"127.0.0.1:{port}", "--store", str(store))
    with _serving(key, *listen, env=env) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        url = proc.stdout.readline().split()[-1]
        sent = _sigwire("send", url, "echo", "--data", "kept", env=env)
        assert sent.returncode == 0, sent.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    with sqlite3.connect(store) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM answers").fetchone()
    assert count == 1


def test_loop_choice() -> None:
    """auto and uvloop pick uvloop (installed with the dev extra); asyncio keeps asyncio's."""
    uvloop = pytest.importorskip("uvloop")
    assert cli._loop_factory("auto") is uvloop.new_event_loop
    assert cli._loop_factory("uvloop") is uvloop.new_event_loop
    assert cli._loop_factory("asyncio") is None


def test_serve_replay_capacity_reaches_the_replay_guard(tmp_path: Path) -> None:
    """--replay-capacity N is the capacity of the served dispatcher's guard (default 1,000,000)."""
    key = tmp_path / "server.pem"
    Identity.generate().save(key)
    parser = cli.build_parser()
    default = cli.build_server(parser.parse_args(["serve", "--key", str(key)]))
    assert default.dispatcher.guard.capacity == 1_000_000
    sized = cli.build_server(
        parser.parse_args(["serve", "--key", str(key), "--replay-capacity", "4"])
    )
    assert sized.dispatcher.guard.capacity == 4


def test_serve_refuses_beyond_a_replay_capacity_full_of_recent_nonces(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """--replay-capacity N: with N nonces all younger than 30 s, the next is OVERLOADED.

    (Older ones would be forgotten instead: docs/security.md section 4.) Each
    `sigwire send` spends two nonces, its connection's signed hello and its
    request: with room for four, the third send is refused at its hello, cleanly.
    """
    key = tmp_path / "server.pem"
    Identity.generate().save(key)
    port = _free_port()
    with _serving(key, "--grpc", f"127.0.0.1:{port}", "--replay-capacity", "4", env=env) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        url = proc.stdout.readline().split()[-1]
        for n in range(2):
            sent = _sigwire("send", url, "echo", "--data", f"m{n}", env=env)
            assert sent.returncode == 0, sent.stderr
            assert sent.stdout == f"m{n}"
        refused = _sigwire("send", url, "echo", "--data", "m2", env=env)
        assert refused.returncode == 1
        assert "replay cache is full" in refused.stderr
        assert "OVERLOADED" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert proc.poll() is None  # still serving


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_serve_refuses_a_replay_capacity_below_one(value: str, env: dict[str, str]) -> None:
    """A capacity that is not a positive whole number is a usage error (exit 2), not a crash."""
    result = _sigwire("serve", "--replay-capacity", value, env=env)
    assert result.returncode == 2
    assert "--replay-capacity" in result.stderr
