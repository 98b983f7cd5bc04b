"""Parsing endpoint URLs into Targets."""

from __future__ import annotations

from typing import Any

import pytest

from sigwire.errors import InvalidTargetError, UnsupportedSchemeError
from sigwire.targets import DEFAULT_WS_PATH, KNOWN_SCHEMES, Target, parse_target

VALID = {
    "grpc://example.com:50051": Target(
        url="grpc://example.com:50051", scheme="grpc", host="example.com", port=50051
    ),
    "grpc://example.com": Target(
        url="grpc://example.com", scheme="grpc", host="example.com", port=50051
    ),
    "grpc://127.0.0.1:1/": Target(
        url="grpc://127.0.0.1:1/", scheme="grpc", host="127.0.0.1", port=1
    ),
    "grpcs://example.com": Target(
        url="grpcs://example.com", scheme="grpcs", host="example.com", port=443, tls=True
    ),
    "grpcs://example.com:8443": Target(
        url="grpcs://example.com:8443", scheme="grpcs", host="example.com", port=8443, tls=True
    ),
    "ws://example.com": Target(
        url="ws://example.com", scheme="ws", host="example.com", port=80, path=DEFAULT_WS_PATH
    ),
    "ws://example.com:8765/custom/path": Target(
        url="ws://example.com:8765/custom/path",
        scheme="ws",
        host="example.com",
        port=8765,
        path="/custom/path",
    ),
    "wss://example.com": Target(
        url="wss://example.com",
        scheme="wss",
        host="example.com",
        port=443,
        path=DEFAULT_WS_PATH,
        tls=True,
    ),
    "unix:///run/sigwire/agent.sock": Target(
        url="unix:///run/sigwire/agent.sock", scheme="unix", path="/run/sigwire/agent.sock"
    ),
    "memory://agent-1": Target(url="memory://agent-1", scheme="memory", path="agent-1"),
    "grpc://[::1]:50051": Target(url="grpc://[::1]:50051", scheme="grpc", host="::1", port=50051),
    "ws://[2001:db8::1]": Target(
        url="ws://[2001:db8::1]", scheme="ws", host="2001:db8::1", port=80, path=DEFAULT_WS_PATH
    ),
    "GRPC://example.com:1": Target(
        url="GRPC://example.com:1", scheme="grpc", host="example.com", port=1
    ),
    "Wss://example.com": Target(
        url="Wss://example.com",
        scheme="wss",
        host="example.com",
        port=443,
        path=DEFAULT_WS_PATH,
        tls=True,
    ),
    "grpc://example.com:65535": Target(
        url="grpc://example.com:65535", scheme="grpc", host="example.com", port=65535
    ),
}


@pytest.mark.parametrize(("url", "expected"), VALID.items(), ids=VALID.keys())
def test_valid_targets_parse(url: str, expected: Target) -> None:
    """Every supported scheme parses, with default ports, TLS flags and the default ws path."""
    assert parse_target(url) == expected


def test_default_ws_path() -> None:
    """The default WebSocket path is /sigwire/v1."""
    assert DEFAULT_WS_PATH == "/sigwire/v1"
    assert parse_target("ws://h").path == "/sigwire/v1"
    assert parse_target("ws://h/").path == "/"


def test_every_known_scheme_parses() -> None:
    """Each scheme in KNOWN_SCHEMES has a URL form that parses to that scheme."""
    examples = {
        "grpc": "grpc://h",
        "grpcs": "grpcs://h",
        "ws": "ws://h",
        "wss": "wss://h",
        "unix": "unix:///tmp/s.sock",
        "memory": "memory://m",
    }
    assert set(KNOWN_SCHEMES) == set(examples)
    for scheme, url in examples.items():
        assert parse_target(url).scheme == scheme


@pytest.mark.parametrize(
    ("url", "authority"),
    [
        ("grpc://[::1]:50051", "[::1]:50051"),
        ("grpc://h", "h:50051"),
        ("wss://1.2.3.4", "1.2.3.4:443"),
    ],
)
def test_authority_brackets_ipv6(url: str, authority: str) -> None:
    """Target.authority is host:port with brackets around an IPv6 host."""
    assert parse_target(url).authority == authority


@pytest.mark.parametrize("scheme", ["http", "https", "tcp", "grpc+tls", "ftp", "file"])
def test_unknown_scheme_lists_supported(scheme: str) -> None:
    """An unknown scheme raises UnsupportedSchemeError whose message lists the supported ones."""
    url = f"{scheme}://example.com:1"
    with pytest.raises(UnsupportedSchemeError) as info:
        parse_target(url)
    error = info.value
    assert error.scheme == scheme
    assert error.url == url
    assert set(error.supported) == set(KNOWN_SCHEMES)
    for known in KNOWN_SCHEMES:
        assert f"{known}://" in str(error)
    assert isinstance(error, InvalidTargetError)
    assert error.reason == "SCHEME_UNSUPPORTED"


def test_scheme_filter_is_honoured() -> None:
    """A scheme outside the schemes a caller passes is unsupported, even a known one."""
    with pytest.raises(UnsupportedSchemeError) as info:
        parse_target("ws://h", schemes=("grpc", "grpcs"))
    assert info.value.supported == ("grpc", "grpcs")
    assert "ws://" not in str(info.value).split("supported:")[1]


INVALID: dict[str, Any] = {
    "missing scheme": "example.com:50051",
    "scheme-relative": "//example.com:50051",
    "empty": "",
    "none": None,
    "not a string": 50051,
    "too long": "grpc://" + "a" * 3000,
    "port 0": "grpc://example.com:0",
    "port 70000": "grpc://example.com:70000",
    "port 65536": "grpc://example.com:65536",
    "port abc": "grpc://example.com:abc",
    "port negative": "grpc://example.com:-1",
    "two ports": "grpc://example.com:1:2",
    "missing host": "grpc://:50051",
    "missing host and port": "grpc://",
    "ws missing host": "ws:///sigwire/v1",
    "credentials": "grpc://user:secret@example.com:50051",
    "username only": "wss://user@example.com",
    "query": "grpc://example.com:50051?insecure=1",
    "ws query": "ws://example.com/sigwire/v1?token=x",
    "fragment": "grpc://example.com:50051#frag",
    "path on grpc": "grpc://example.com:50051/some/path",
    "path on grpcs": "grpcs://example.com/x",
    "bare ipv6": "grpc://::1:50051",
    "unclosed ipv6": "grpc://[::1:50051",
    "bad ipv6": "grpc://[zz::1]:50051",
    "unix with host": "unix://host/tmp/s.sock",
    "unix without path": "unix://",
    "unix with query": "unix:///tmp/s.sock?x=1",
    "memory without name": "memory://",
    "memory with query": "memory://name?x=1",
}


@pytest.mark.parametrize("url", INVALID.values(), ids=INVALID.keys())
def test_invalid_targets_raise(url: Any) -> None:
    """A malformed URL raises InvalidTargetError (never another exception)."""
    with pytest.raises(InvalidTargetError) as info:
        parse_target(url)
    assert type(info.value) is InvalidTargetError
    assert info.value.reason == "TARGET_INVALID"
    assert len(info.value.url) <= 2048


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("example.com:1", "missing scheme"),
        ("grpc://example.com:0", "port"),
        ("grpc://example.com:abc", "port"),
        ("grpc://:1", "missing host"),
        ("grpc://u:p@h:1", "credentials"),
        ("grpc://h:1?q=1", "query"),
        ("grpc://h:1/p", "path"),
    ],
)
def test_invalid_target_message_says_why(url: str, words: str) -> None:
    """The InvalidTargetError message names the URL and the problem."""
    with pytest.raises(InvalidTargetError, match=words) as info:
        parse_target(url)
    assert url in str(info.value)
