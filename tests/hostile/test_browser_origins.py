"""Web pages in an operator's browser cannot reach an agent over WebSocket unless allowed.

Any site can make a visitor's browser open a WebSocket to 127.0.0.1; the
browser then sends the page's origin in an ``Origin`` header. The listener
refuses such handshakes (403) unless the origin is allowed, and lets through
handshakes without the header: programs, not pages.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

import sigwire
from tests.conftest import TIMEOUT
from tests.hostile.conftest import PROTO, assert_still_serves
from tests.servers import LOCAL, MakeServer


async def _handshake(url: str, *headers: tuple[str, str]) -> tuple[int, str]:
    """Status and body of a WebSocket handshake sending ``headers``: 101 when it opens."""
    try:
        async with asyncio.timeout(TIMEOUT):
            async with ws_connect(
                url, subprotocols=[Subprotocol(PROTO)], additional_headers=list(headers)
            ):
                return 101, ""
    except InvalidStatus as exc:
        return exc.response.status_code, exc.response.body.decode()


def _ws_url(server: sigwire.Server) -> str:
    [url] = [url for url in server.urls if url.startswith("ws://")]
    return url


async def test_a_web_page_cannot_open_a_stream_by_default(make_server: MakeServer) -> None:
    """A handshake with an Origin gets 403 and a reason; one without opens; all keep serving."""
    server = await make_server()
    url = _ws_url(server)
    status, body = await _handshake(url, ("Origin", "https://evil.example"))
    assert status == 403
    assert "origin https://evil.example may not open a sigwire stream here" in body
    assert "--allow-origin" in body
    assert await _handshake(url) == (101, "")
    await assert_still_serves(server)


@pytest.mark.parametrize(
    ("origin", "admitted"),
    [
        ("https://app.example.com", True),
        ("https://app.example.com:443", True),
        ("HTTPS://APP.Example.COM", True),
        ("http://localhost:8080", True),
        ("http://app.example.com", False),
        ("https://app.example.com:8443", False),
        ("https://evil.app.example.com", False),
        ("https://app.example.com.evil.example", False),
        ("http://localhost:8081", False),
        ("http://localhost", False),
        ("null", False),
        ("", False),
        ("app.example.com", False),
    ],
)
async def test_allowed_origins_compare_by_scheme_host_and_port(
    make_server: MakeServer, origin: str, admitted: bool
) -> None:
    """An origin is admitted only if scheme, host and port equal an allowed one (RFC 6454)."""
    server = await make_server(allow_origins=["https://App.Example.com/", "http://localhost:8080"])
    status, _ = await _handshake(_ws_url(server), ("Origin", origin))
    assert status == (101 if admitted else 403)


async def test_two_origin_headers_are_refused(make_server: MakeServer) -> None:
    """A handshake with two Origin headers is refused even if one of them is allowed."""
    server = await make_server(allow_origins=["https://app.example.com"])
    status, body = await _handshake(
        _ws_url(server), ("Origin", "https://app.example.com"), ("Origin", "https://evil.example")
    )
    assert status == 403
    assert "more than one Origin header" in body


async def test_any_origin_is_an_explicit_opt_in(make_server: MakeServer) -> None:
    """With ``*`` allowed, every page may connect, opaque (null) origins included."""
    server = await make_server(allow_origins=["*"])
    for origin in ("https://anything.example", "null"):
        assert await _handshake(_ws_url(server), ("Origin", origin)) == (101, "")


@pytest.mark.parametrize(
    "origin", ["null", "https://app.example.com/path", "app.example.com", "https://", ""]
)
def test_an_allowed_origin_must_be_an_origin(origin: str) -> None:
    """allow_origins refuses what is not scheme://host[:port], naming the entry."""
    with pytest.raises(ValueError, match="not an origin"):
        sigwire.Server(sigwire.Identity.generate(), ws=LOCAL, allow_origins=[origin])
