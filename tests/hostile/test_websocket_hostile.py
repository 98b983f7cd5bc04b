"""The WebSocket listener under hostile clients: close codes, raw HTTP garbage, a connection flood.

Each bad message closes only the connection that sent it, with the close code
of docs/protocol.md section 3; the listener keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

import sigwire
from sigwire import _proto
from sigwire.session import max_frame_size
from tests.conftest import TIMEOUT
from tests.hostile.conftest import (
    JSON,
    PROTO,
    UNDECODABLE,
    assert_still_serves,
)

FLOOD = 300

INVALID_JSON = {
    "not-json": "{not json",
    "empty-text": "",
    "null": "null",
    "number": "42",
    "string": '"frame"',
    "unknown-field": '{"noSuchField": 1}',
    "sequence-not-a-number": '{"sequence": "x"}',
    "sequence-negative": '{"sequence": "-1"}',
    "sequence-over-uint64": '{"sequence": "18446744073709551616"}',
    "sequence-float": '{"sequence": 1.5}',
    "null-envelope": '{"envelopes": {"envelopes": [null]}}',
    "two-bodies": '{"envelopes": {"envelopes": []}, "ping": {}}',
    "unpaired-surrogate": '{"envelopes": {"envelopes": [{"id": "\\ud800"}]}}',
    "created-at-not-int": '{"envelopes": {"envelopes": [{"createdAtMs": "soon"}]}}',
    "nested-100000-deep": "[" * 100_000,
    "trailing-garbage": '{"sequence": "1"} x',
}
PINGS: dict[str, str | bytes] = {
    PROTO: _proto.pb.Frame(ping=_proto.pb.Ping(token=1)).SerializeToString(),
    JSON: '{"ping": {"token": "1"}}',
}
BAD_MESSAGES = [
    pytest.param(PROTO, "a text message", 1003, "UNSUPPORTED_DATA", id="text-on-proto"),
    pytest.param(PROTO, '{"sequence": "1"}', 1003, "UNSUPPORTED_DATA", id="json-text-on-proto"),
    pytest.param(JSON, b"\x08\x01", 1003, "UNSUPPORTED_DATA", id="binary-on-json"),
    pytest.param(JSON, b"", 1003, "UNSUPPORTED_DATA", id="empty-binary-on-json"),
    *(
        pytest.param(JSON, text, 1007, "MALFORMED", id=f"json-{name}")
        for name, text in INVALID_JSON.items()
    ),
    pytest.param(JSON, "[]", 1007, "MALFORMED", id="json-empty-array"),
    pytest.param(JSON, '""', 1007, "MALFORMED", id="json-empty-string"),
    *(
        pytest.param(PROTO, data, 1007, "MALFORMED", id=f"proto-{name}")
        for name, data in UNDECODABLE.items()
    ),
    pytest.param(PROTO, b"\x00" * (max_frame_size(1024) + 1), 1009, "", id="oversized-proto"),
    pytest.param(JSON, "x" * (max_frame_size(1024) + 1), 1009, "", id="oversized-json"),
]


@pytest.mark.parametrize(("subprotocol", "message", "code", "reason"), BAD_MESSAGES)
async def test_bad_message_closes_with_its_code(
    small_server: sigwire.Server,
    subprotocol: Subprotocol,
    message: str | bytes,
    code: int,
    reason: str,
) -> None:
    """A message its subprotocol forbids closes that connection with the documented code."""
    # A Ping right behind it: a Pong would mean the bad message was accepted.
    ping = PINGS[subprotocol]
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(small_server.urls[1], subprotocols=[subprotocol]) as ws:
            assert ws.subprotocol == subprotocol
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(message)
                await ws.send(ping)
                answer = await ws.recv()
                pytest.fail(f"the connection survived and answered {answer!r}")
    assert ws.close_code == code
    assert (ws.close_reason or "").startswith(reason)
    assert "Traceback" not in (ws.close_reason or "")
    await assert_still_serves(small_server)


async def test_invalid_utf8_text_frame_closes_1007(server: sigwire.Server) -> None:
    """A text frame that is not UTF-8 is refused by the WebSocket layer itself with 1007."""
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[JSON]) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(b'{"sequence": "\xff"}', text=True)
            await ws.wait_closed()
    assert ws.close_code == 1007
    await assert_still_serves(server)


SUBPROTOCOLS = {
    "none": None,
    "unknown": [Subprotocol("chat")],
    "other-version": [Subprotocol("sigwire.v2.proto")],
    "wrong-case": [Subprotocol("SIGWIRE.V1.PROTO")],
}


@pytest.mark.parametrize("offered", SUBPROTOCOLS.values(), ids=SUBPROTOCOLS.keys())
async def test_no_known_subprotocol_closes_1002(
    server: sigwire.Server, offered: list[Subprotocol] | None
) -> None:
    """A client offering no sigwire subprotocol is closed with 1002 PROTOCOL."""
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=offered) as ws:
            await ws.wait_closed()
    assert ws.close_code == 1002
    assert (ws.close_reason or "").startswith("PROTOCOL")
    await assert_still_serves(server)


def _request(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


_UPGRADE = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13")
RAW_HTTP: dict[str, tuple[bytes, bytes]] = {
    "other-path": (_request("/other"), b"404"),
    "path-traversal": (_request("/sigwire/v1/../../etc/passwd"), b"404"),
    "no-upgrade": (_request("/sigwire/v1"), b"426"),
    "bad-key": (_request("/sigwire/v1", *_UPGRADE, "Sec-WebSocket-Key: short"), b"400"),
    "wrong-version": (
        _request(
            "/sigwire/v1", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 8"
        ),
        b"400",
    ),
    "post": (b"POST /sigwire/v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", b""),
    "header-line-16k": (_request("/sigwire/v1", "X-Junk: " + "j" * 16384), b""),
    "500-headers": (_request("/sigwire/v1", *(f"X-H{i}: v" for i in range(500))), b""),
    "not-http": (random.Random(4).randbytes(2048), b""),
    "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b""),
}
# (A request that never ends its header, such as a TLS ClientHello, is held until
# websockets' open_timeout of 10 s; docs/security.md lists that among the limits.)


@pytest.mark.parametrize(("data", "status"), RAW_HTTP.values(), ids=RAW_HTTP.keys())
async def test_raw_http_garbage_is_answered_and_dropped(
    server: sigwire.Server, data: bytes, status: bytes
) -> None:
    """Bytes that are not a WebSocket handshake get an HTTP error (or nothing) and a close."""
    port = int(server.urls[1].rsplit(":", 1)[1].split("/", 1)[0])
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := await reader.read(65536):
                    answer += chunk
        finally:
            writer.close()
    assert not answer.startswith(b"HTTP/1.1 101"), answer[:80]
    if status:
        assert answer.split(b" ", 2)[1] == status, answer[:80]
    await assert_still_serves(server)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def _sessions_drain_to(server: sigwire.Server, count: int) -> None:
    # Observation only (no event exists for it): poll the server's session count.
    async with asyncio.timeout(TIMEOUT):
        while len(server._all_sessions) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_connection_flood(server: sigwire.Server) -> None:
    """300 silent connections at once: the server keeps serving and forgets them all after."""
    # Both ends of every connection live in this process, plus grpc's own files.
    _raise_fd_limit(4 * FLOOD + 256)
    url = server.urls[1]
    flood: list[ClientConnection] = []
    try:
        async with asyncio.timeout(TIMEOUT):
            flood = list(
                await asyncio.gather(
                    *(
                        ws_connect(url, subprotocols=[PROTO], open_timeout=TIMEOUT)
                        for _ in range(FLOOD)
                    )
                )
            )
        assert all(ws.subprotocol == PROTO for ws in flood)
        await _sessions_drain_to(server, FLOOD)
        # Never sent a hello: not bound to any DID.
        assert server.connected() == []
        await assert_still_serves(server)
    finally:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(ws.close() for ws in flood))
    assert all(ws.close_code == 1000 for ws in flood)
    await _sessions_drain_to(server, 0)
    assert server.connected() == []
    await assert_still_serves(server)
    await _sessions_drain_to(server, 0)
    assert server.connected() == []
