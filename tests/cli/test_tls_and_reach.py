"""The sigwire command on TLS and reach: one clear line for each mistake, no silent plaintext."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sigwire import cli
from sigwire.signing import Identity
from tests.cli.test_serve import _free_port, _serving, _sigwire
from tests.conftest import TIMEOUT
from tests.integration.helpers import Certs, make_certs


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environ = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    environ.pop("SIGWIRE_KEY", None)
    return environ


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The only stderr line: no traceback, and nothing from grpc's C core, before it."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # nothing from grpc's C core before it
    return lines[0]


def test_a_client_certificate_without_its_key_is_a_usage_error(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """send grpcs:// --tls-cert without --tls-key exits 2 with one line; grpc would abort."""
    certs = make_certs(tmp_path)
    result = _sigwire(
        "send", "grpcs://127.0.0.1:1", "echo", "--tls-cert", certs.client_cert, env=env
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "sigwire: error: --tls-cert and --tls-key go together "
        "(the client certificate and its key)\n"
    )
    assert not (tmp_path / "config").exists()  # no identity made for a refused command


@pytest.fixture
def mtls_agent(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[str, Certs]]:
    """A `sigwire serve` requiring client certificates: its grpcs:// URL and the PKI."""
    certs = make_certs(tmp_path)
    key = tmp_path / "agent.pem"
    Identity.generate().save(key)
    tls = ("--tls-cert", certs.server_cert, "--tls-key", certs.server_key, "--tls-ca", certs.ca)
    with _serving(key, "--grpc", f"127.0.0.1:{_free_port()}", *tls, env=env) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        yield proc.stdout.readline().split()[-1], certs


def test_grpcs_failures_say_which(
    mtls_agent: tuple[str, Certs], env: dict[str, str], tmp_path: Path
) -> None:
    """A wrong CA and a missing client certificate each get one line saying what to give."""
    url, certs = mtls_agent
    me = tmp_path / "me.pem"
    Identity.generate().save(me)
    wrong_ca = _sigwire("send", url, "echo", "--key", str(me), "--tls-ca", certs.other_ca, env=env)
    assert wrong_ca.returncode == 1
    line = _error_line(wrong_ca)
    assert "the server's certificate is not trusted" in line
    assert "--tls-ca" in line
    no_cert = _sigwire("send", url, "echo", "--key", str(me), "--tls-ca", certs.ca, env=env)
    assert no_cert.returncode == 1
    line = _error_line(no_cert)
    assert "the server requires a client certificate" in line
    assert "--tls-cert and --tls-key" in line
    mutual = ("--tls-cert", certs.client_cert, "--tls-key", certs.client_key)
    sent = _sigwire("send", url, "echo", "--data", "ok", "--tls-ca", certs.ca, *mutual, env=env)
    assert (sent.returncode, sent.stdout) == (0, "ok"), sent.stderr


def test_serve_on_a_wildcard_address_warns_and_publishes_what_is_advertised(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """serve --grpc 0.0.0.0:P warns that it serves plaintext; its card lists --advertise only."""
    key = tmp_path / "server.pem"
    Identity.generate().save(key)
    port = _free_port()
    advertised = f"grpc://127.0.0.1:{port}"
    listen = ("--grpc", f"0.0.0.0:{port}", "--advertise", advertised)
    with _serving(key, *listen, env=env, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        assert proc.stdout.readline().strip() == f"listening on grpc://0.0.0.0:{port}"
        described = _sigwire("describe", advertised, env=env)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)["endpoints"] == [advertised]
    assert f"WARNING sigwire.server: grpc://0.0.0.0:{port} serves plaintext beyond" in stderr


def test_send_refuses_a_plaintext_fallback_after_tls_unless_allowed(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """grpcs:// then --fallback ws:// exits 1 naming both; --allow-insecure-fallback uses it."""
    key = tmp_path / "server.pem"
    Identity.generate().save(key)
    with _serving(key, "--grpc", "", "--ws", f"127.0.0.1:{_free_port()}", env=env) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        ws_url = proc.stdout.readline().split()[-1]
        with socket.socket() as dead:
            dead.bind(("127.0.0.1", 0))
            secure = f"grpcs://127.0.0.1:{dead.getsockname()[1]}"
            args = ("send", secure, "echo", "--data", "x", "--fallback", ws_url, "--key", str(key))
            refused = _sigwire(*args, "--connect-timeout", "1", env=env)
            allowed = _sigwire(
                *args, "--connect-timeout", "1", "--allow-insecure-fallback", env=env
            )
    assert refused.returncode == 1
    line = _error_line(refused)
    assert line.startswith(f"sigwire: error: invalid target '{ws_url}': a plaintext fallback")
    assert secure in line
    assert "--allow-insecure-fallback" in line
    assert (allowed.returncode, allowed.stdout) == (0, "x"), allowed.stderr


def test_serve_allow_origin_and_advertise_reach_the_server(tmp_path: Path) -> None:
    """--allow-origin and --advertise (repeatable) configure the listener and the card."""
    key = tmp_path / "server.pem"
    Identity.generate().save(key)
    args = cli.build_parser().parse_args(
        [
            "serve", "--key", str(key), "--ws", "127.0.0.1:0",
            "--allow-origin", "https://app.example.com", "--allow-origin", "http://localhost:3000",
            "--advertise", "grpcs://agent.example.com", "--advertise", "wss://agent.example.com",
        ]
    )  # fmt: skip
    server = cli.build_server(args)
    assert server.advertise == ("grpcs://agent.example.com", "wss://agent.example.com")
    ws = server._listeners[1]
    assert getattr(ws, "allowed_origins", None) == {
        ("https", "app.example.com", 443),
        ("http", "localhost", 3000),
    }


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--allow-origin", "null", "not an origin: 'null'"),
        ("--allow-origin", "https://app.example.com/login", "not an origin"),
        ("--advertise", "grpc://0.0.0.0:50051", "a wildcard address is for binding"),
        ("--advertise", "ftp://agent.example.com", "unsupported scheme"),
    ],
)
def test_serve_refuses_a_bad_origin_or_advertised_url(
    env: dict[str, str], flag: str, value: str, problem: str
) -> None:
    """A value that is not an origin, or an advertised wildcard, is a usage error (exit 2)."""
    result = _sigwire("serve", flag, value, env=env)
    assert result.returncode == 2
    assert flag in result.stderr
    assert problem in result.stderr


def test_serve_refuses_allow_origin_without_a_websocket_listener(env: dict[str, str]) -> None:
    """--allow-origin without --ws would admit nothing: a usage error naming both flags."""
    result = _sigwire(
        "serve", "--grpc", "127.0.0.1:0", "--allow-origin", "https://app.example.com", env=env
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "sigwire: error: --allow-origin admits web pages to the WebSocket listener: give --ws too"
    ]
