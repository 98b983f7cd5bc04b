"""The sigwire command on pins and identities: one clear line for each mistake."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sigwire.signing import Identity
from tests.cli.test_serve import _free_port, _serving, _sigwire


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environ = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    environ.pop("SIGWIRE_KEY", None)
    return environ


@pytest.fixture
def agent(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """A plaintext `sigwire serve` on loopback: its URL and DID."""
    key = tmp_path / "server.pem"
    identity = Identity.generate()
    identity.save(key)
    with _serving(key, "--grpc", f"127.0.0.1:{_free_port()}", env=env) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        yield proc.stdout.readline().split()[-1], identity.did


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last stderr line, after checking that no traceback came before it."""
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["send", "ping", "describe"])
def test_an_expect_did_that_is_not_a_did_is_a_usage_error(
    agent: tuple[str, str], env: dict[str, str], command: str
) -> None:
    """--expect-did notadid exits 2 naming the problem, and never reports the agent SERVING."""
    url, _ = agent
    args = [command, url, *(["echo"] if command == "send" else []), "--expect-did", "notadid"]
    result = _sigwire(*args, env=env)
    assert result.returncode == 2
    assert "SERVING" not in result.stdout
    assert "invalid DID 'notadid': not a DID" in _error_line(result)


@pytest.mark.parametrize("command", ["send", "ping", "describe"])
def test_a_wrong_pin_names_both_dids(
    agent: tuple[str, str], env: dict[str, str], command: str
) -> None:
    """--expect-did of another agent exits 1 with "expected A, the agent is B" and nothing else."""
    url, did = agent
    other = Identity.generate().did
    args = [command, url, *(["echo"] if command == "send" else []), "--expect-did", other]
    result = _sigwire(*args, env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert _error_line(result) == (
        f"sigwire: error: expected {other}, the agent is {did} [SIGNER_UNKNOWN]"
    )
    pinned = _sigwire(
        *[command, url, *(["echo"] if command == "send" else []), "--expect-did", did], env=env
    )
    assert pinned.returncode == 0, pinned.stderr


def test_describe_with_key_reaches_an_allow_listed_agent(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """describe --key says hello as that identity, so an agent that allow-lists it answers."""
    server_key, client_key, trust = tmp_path / "s.pem", tmp_path / "c.pem", tmp_path / "trust"
    server = Identity.generate()
    server.save(server_key)
    client = Identity.generate()
    client.save(client_key)
    trust.write_text(client.did + "\n")
    port = _free_port()
    with _serving(server_key, "--grpc", f"127.0.0.1:{port}", "--trust", str(trust), env=env) as p:
        assert p.stdout is not None
        p.stdout.readline()
        url = p.stdout.readline().split()[-1]
        throwaway = _sigwire("describe", url, env=env)
        assert throwaway.returncode == 1
        assert _error_line(throwaway) == (
            f"sigwire: error: {url} does not admit the throwaway identity describe says "
            "hello with (it allow-lists its peers): give --key with a key it admits "
            "[SIGNER_UNKNOWN]"
        )
        described = _sigwire("describe", url, "--key", str(client_key), env=env)
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)["did"] == server.did


def test_a_created_identity_is_announced_on_stderr(tmp_path: Path, env: dict[str, str]) -> None:
    """A mistyped $SIGWIRE_KEY creates a new identity once, and says so with its DID and path."""
    mistyped = tmp_path / "keys" / "idenity.pem"
    env = {**env, "SIGWIRE_KEY": str(mistyped)}
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        url = f"grpc://127.0.0.1:{dead.getsockname()[1]}"
        first = _sigwire("send", url, "echo", "--connect-timeout", "0.5", env=env)
        again = _sigwire("send", url, "echo", "--connect-timeout", "0.5", env=env)
    did = Identity.load(mistyped).did
    assert f"created a new identity {did} in {mistyped} (named by $SIGWIRE_KEY)" in first.stderr
    assert "created a new identity" not in again.stderr
    assert first.returncode == again.returncode == 1
