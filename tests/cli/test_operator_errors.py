"""Bad operator input to a real `sigwire` process ends in one line that says what to do."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sigwire.signing import Identity
from tests.conftest import TIMEOUT
from tests.integration.helpers import make_certs

# The console script, as users run it: `python -m sigwire` would put the current
# directory on sys.path by itself and hide how `--app` is imported.
SIGWIRE = str(Path(sys.executable).with_name("sigwire"))


def _sigwire(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SIGWIRE, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=cwd,
        check=False,
    )


def _one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The single stderr line of a run-time failure (exit 1), checked for ``needles``."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sigwire: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _serving(*args: str, env: dict[str, str], cwd: Path | None = None) -> Iterator[str]:
    """A `sigwire serve ARGS` process; yields its first URL, ends it with SIGTERM."""
    proc = subprocess.Popen(
        [SIGWIRE, "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        first = proc.stdout.readline()
        assert first.startswith("sigwire agent "), (first, proc.stderr.read())
        yield proc.stdout.readline().split()[-1]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environ = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    environ.pop("PYTHONPATH", None)
    environ.pop("SIGWIRE_KEY", None)
    return environ


@pytest.fixture
def key(tmp_path: Path) -> str:
    path = tmp_path / "server.pem"
    Identity.generate().save(path)
    return str(path)


APP = """
import asyncio


def register(server):
    @server.on("hello")
    async def hello(msg):
        return b"hello from the app"

    @server.on("never")
    async def never(msg):
        await asyncio.Event().wait()


def broken(server):
    raise ZeroDivisionError("the app's own bug")
"""


def test_app_in_the_current_directory_is_served(
    tmp_path: Path, key: str, env: dict[str, str]
) -> None:
    """serve --app myapp:register finds ./myapp.py without PYTHONPATH."""
    (tmp_path / "myapp.py").write_text(APP)
    listen = ("--grpc", f"127.0.0.1:{_free_port()}")
    with _serving("--key", key, *listen, "--app", "myapp:register", env=env, cwd=tmp_path) as url:
        sent = _sigwire("send", url, "hello", env=env)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout == "hello from the app"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nosuchapp:register", "no module named 'nosuchapp'"),
        ("myapp:regster", "has no attribute 'regster'"),
    ],
)
def test_app_that_cannot_be_loaded_is_one_line(
    tmp_path: Path, key: str, env: dict[str, str], spec: str, needle: str
) -> None:
    """A missing --app module or attribute is named in one line, exit 1."""
    (tmp_path / "myapp.py").write_text(APP)
    result = _sigwire("serve", "--key", key, "--app", spec, env=env, cwd=tmp_path)
    _one_error_line(result, "--app", needle)


def test_unexpected_error_is_one_line_and_its_traceback_shows_with_verbose(
    tmp_path: Path, key: str, env: dict[str, str]
) -> None:
    """A bug (here an --app that raises) is one line with a -v hint; -v shows the traceback."""
    (tmp_path / "myapp.py").write_text(APP)
    args = ("serve", "--key", key, "--app", "myapp:broken")
    quiet = _sigwire(*args, env=env, cwd=tmp_path)
    _one_error_line(quiet, "ZeroDivisionError", "the app's own bug", "rerun with -v")
    verbose = _sigwire(*args, "-v", env=env, cwd=tmp_path)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr
    assert verbose.stderr.splitlines()[-1].startswith("sigwire: error: unexpected ZeroDivision")


def test_serve_on_a_port_in_use_is_one_line(key: str, env: dict[str, str]) -> None:
    """serve --grpc on a port another process listens on says so in one line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = _sigwire("serve", "--key", key, "--grpc", address, env=env)
    _one_error_line(result, address, "already in use")


@pytest.mark.parametrize("flag", ["--grpc", "--ws"])
def test_serve_on_an_unknown_host_is_one_line(flag: str, key: str, env: dict[str, str]) -> None:
    """serve on a host name that does not resolve names the flag and the host in one line."""
    listen = ["--grpc", "", "--ws", "no-such-host.invalid:0"]
    if flag == "--grpc":
        listen = ["--grpc", "no-such-host.invalid:0"]
    result = _sigwire("serve", "--key", key, *listen, env=env)
    _one_error_line(result, flag, "unknown host 'no-such-host.invalid'")


def test_serve_with_a_certificate_and_a_key_that_do_not_match_is_one_line(
    tmp_path: Path, key: str, env: dict[str, str]
) -> None:
    """--tls-cert with another certificate's key is named as a mismatch, before binding."""
    certs = make_certs(tmp_path)
    tls = ("--tls-cert", certs.server_cert, "--tls-key", certs.client_key)
    result = _sigwire("serve", "--key", key, "--grpc", "127.0.0.1:0", *tls, env=env)
    _one_error_line(result, "is not the key of --tls-cert")


def _corrupt_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    data = bytearray(path.read_bytes())
    data[100:] = b"\xa5" * (len(data) - 100)  # header kept, pages garbage
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["directory", "text file", "corrupt sqlite"])
def test_serve_with_an_unusable_store_is_one_line(
    tmp_path: Path, key: str, env: dict[str, str], kind: str
) -> None:
    """--store naming a directory, a text file or a corrupt database fails in one line."""
    store = tmp_path / "agent.db"
    if kind == "directory":
        store.mkdir()
    elif kind == "text file":
        store.write_text("not a database\n")
    else:
        _corrupt_sqlite(store)
    result = _sigwire(
        "serve", "--key", key, "--grpc", "127.0.0.1:0", "--store", str(store), env=env
    )
    _one_error_line(result, "--store", str(store))


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["ping", "grpc://127.0.0.1:1", "--count", "0"], "--count"),
        (["send", "grpc://127.0.0.1:1", "echo", "--timeout", "-1"], "--timeout"),
        (["send", "grpc://127.0.0.1:1", "echo", "--timeout", "nan"], "--timeout"),
        (["send", "grpc://127.0.0.1:1", "echo", "--timeout", "inf"], "--timeout"),
        (["ping", "grpc://127.0.0.1:1", "--connect-timeout", "0"], "--connect-timeout"),
        (["serve", "--max-message-size", "0"], "--max-message-size"),
        (["serve", "--max-message-size", str(2**31 - 1)], "--max-message-size"),
        (["serve", "--grace", "-1"], "--grace"),
        (["serve", "--ws-path", "nopath"], "--ws-path"),
        (["serve", "--grpc", "127.0.0.1"], "--grpc"),
        (["serve", "--ws", "127.0.0.1:99999"], "--ws"),
    ],
)
def test_out_of_range_values_are_usage_errors(
    args: list[str], flag: str, env: dict[str, str]
) -> None:
    """Values a command cannot use are refused by the parser: exit 2, the flag named."""
    result = _sigwire(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"sigwire {args[0]}: error: argument {flag}"), last


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--grpc", ""], "nothing to serve"),
        (["--tls-cert", "server.pem"], "--tls-cert and --tls-key go together"),
        (["--app", "myapp"], "--app takes MODULE:ATTR"),
    ],
)
def test_flags_that_cannot_work_together_are_usage_errors(
    args: list[str], needle: str, key: str, env: dict[str, str]
) -> None:
    """serve with no listener, a certificate without its key or an --app without :ATTR: exit 2."""
    result = _sigwire("serve", "--key", key, *args, env=env)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"sigwire: error: {needle}"), result.stderr


def test_non_utf8_data_is_refused_with_a_pointer_to_file(env: dict[str, str]) -> None:
    """send --data with bytes that are not UTF-8 says to use --file instead."""
    argv = [os.fsencode(SIGWIRE)]
    argv += [b"send", b"grpc://127.0.0.1:1", b"echo", b"--data", b"\xff\xfe"]
    result = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, env=env, check=False)
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
    assert b"--file" in result.stderr.splitlines()[-1]


def test_empty_trust_file_is_refused_unless_allowed(
    tmp_path: Path, key: str, env: dict[str, str]
) -> None:
    """An empty --trust file stops serve; with --allow-empty-trust it serves and warns."""
    trust = tmp_path / "allow.txt"
    trust.write_text("# nobody yet\n\n")
    listen = ("--grpc", f"127.0.0.1:{_free_port()}")
    refused = _sigwire("serve", "--key", key, *listen, "--trust", str(trust), env=env)
    _one_error_line(refused, str(trust), "lists no DIDs", "--allow-empty-trust")

    allowed = ("--trust", str(trust), "--allow-empty-trust")
    proc = subprocess.Popen(
        [SIGWIRE, "serve", "--key", key, *listen, *allowed],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        warning = proc.stderr.readline()
        assert warning.startswith("sigwire: warning: "), warning
        assert "every sender is refused" in warning
        assert proc.stdout.readline().startswith("sigwire agent ")
        url = proc.stdout.readline().split()[-1]
        sent = _sigwire("send", url, "echo", "--data", "hi", env=env)
        assert sent.returncode == 1
        assert "SIGNER_UNKNOWN" in sent.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()


def test_send_without_stream_prints_every_part_of_a_streamed_answer(
    key: str, env: dict[str, str]
) -> None:
    """send to a streaming kind without --stream prints all parts, one a line, not the first."""
    with _serving("--key", key, "--grpc", f"127.0.0.1:{_free_port()}", env=env) as url:
        streamed = _sigwire("send", url, "count", "--data", "4", env=env)
        assert streamed.returncode == 0, streamed.stderr
        assert streamed.stdout == "0\n1\n2\n3\n"
        single = _sigwire("send", url, "echo", "--data", "once", env=env)
        assert single.returncode == 0, single.stderr
        assert single.stdout == "once"


def test_closed_stdout_ends_quietly(tmp_path: Path, key: str, env: dict[str, str]) -> None:
    """A reader that closes the pipe (`| head`) ends the command without a word."""
    client = tmp_path / "client.pem"
    Identity.generate().save(client)
    with _serving("--key", key, "--grpc", f"127.0.0.1:{_free_port()}", env=env) as url:
        counted = ["send", url, "count", "--data", "10000", "--key", str(client)]
        for args in (["did", key], counted):
            proc = subprocess.Popen(
                [SIGWIRE, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            assert proc.stdout is not None
            assert proc.stderr is not None
            proc.stdout.close()
            err = proc.stderr.read()
            proc.stderr.close()
            assert proc.wait(TIMEOUT) == 128 + signal.SIGPIPE, err
            assert err == b""


def test_verbose_works_after_the_command_and_version_is_printed(
    key: str, env: dict[str, str]
) -> None:
    """-v is accepted after the command as before it; --version prints the package version."""
    from importlib.metadata import version

    for args in (["-v", "did", key], ["did", "-v", key], ["did", key, "-v"]):
        result = _sigwire(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.startswith("did:key:")
    shown = _sigwire("--version", env=env)
    assert shown.returncode == 0
    assert shown.stdout == f"sigwire {version('sigwire')}\n"


def test_verbose_after_the_command_reaches_the_log_level() -> None:
    """`sigwire did -v` and `sigwire -v did` both parse to verbose; neither given, not."""
    from sigwire.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["did", "-v"]).verbose is True
    assert parser.parse_args(["-v", "did"]).verbose is True
    assert parser.parse_args(["did"]).verbose is False


def test_a_newly_created_identity_is_announced_once(
    tmp_path: Path, key: str, env: dict[str, str]
) -> None:
    """send without --key that creates the per-user key says so on stderr, the first time only."""
    typo = tmp_path / "idnetity.pem"
    with _serving("--key", key, "--grpc", f"127.0.0.1:{_free_port()}", env=env) as url:
        mine = {**env, "SIGWIRE_KEY": str(typo)}
        first = _sigwire("send", url, "echo", "--data", "hi", env=mine)
        assert first.returncode == 0, first.stderr
        did = Identity.load(typo).did
        announced = [line for line in first.stderr.splitlines() if "new identity" in line]
        assert len(announced) == 1, first.stderr
        assert f"created a new identity {did} in {typo}" in announced[0]
        again = _sigwire("send", url, "echo", "--data", "hi", env=mine)
        assert again.returncode == 0, again.stderr
        assert again.stderr == ""


def test_send_past_its_timeout_says_no_reply_came(
    tmp_path: Path, key: str, env: dict[str, str]
) -> None:
    """send to a handler that never answers says no reply came within --timeout, in one line."""
    (tmp_path / "myapp.py").write_text(APP)
    listen = ("--grpc", f"127.0.0.1:{_free_port()}", "--app", "myapp:register", "--grace", "0")
    client = tmp_path / "client.pem"
    Identity.generate().save(client)
    with _serving("--key", key, *listen, env=env, cwd=tmp_path) as url:
        result = _sigwire("send", url, "never", "--key", str(client), "--timeout", "0.5", env=env)
    _one_error_line(result, "no reply to 'never' within 0.5s (--timeout)", "DEADLINE_EXCEEDED")
