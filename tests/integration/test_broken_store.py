"""A store that fails underneath a running server: INTERNAL with an error id, never a hang.

The store is a real SQLite file whose ``answers`` table is dropped while the
server runs, so every fresh request's lookup raises ``sqlite3.OperationalError``
inside the dispatcher. Each RPC, and each Connect stream (gRPC and WebSocket),
must answer ``INTERNAL`` with an error id that the server logged at ERROR with
the traceback; nothing about SQLite reaches the peer.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

import sigwire
from sigwire import _proto, store
from tests.conftest import TIMEOUT
from tests.integration.conftest import MakeServer, OpenChannel, Probe
from tests.integration.helpers import envelope, rpc_failure, stub, to_pb
from tests.servers import LOCAL

ERROR_ID = re.compile(r"[0-9a-f]{12}")


@pytest.fixture
async def broken(make_server: MakeServer, tmp_path: Path) -> AsyncIterator[sigwire.Server]:
    """A gRPC + WebSocket server whose store lost its answers table (mended before it stops)."""
    server = await make_server(grpc=LOCAL, ws=LOCAL, store=tmp_path / "agent.db")
    assert server.store is not None
    server.store._db.execute("DROP TABLE answers")
    yield server
    mend(server)


def mend(server: sigwire.Server) -> None:
    """Give the server's store its tables back."""
    assert server.store is not None
    server.store._db.executescript(store._SCHEMA)


def _logged(caplog: pytest.LogCaptureFixture, error_id: str) -> logging.LogRecord:
    """The ERROR record naming ``error_id``, which must carry the store's traceback."""
    [record] = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert "no such table" in str(record.exc_info[1])
    return record


def _check_hidden(message: str, details: dict[str, str] | object) -> None:
    text = f"{message} {details}".lower()
    for leak in ("sqlite", "operationalerror", "no such table", "traceback"):
        assert leak not in text, f"{leak!r} reached the peer: {text}"


async def test_send_and_send_stream_answer_internal_with_an_error_id(
    broken: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing store makes ``Send`` and ``SendStream`` INTERNAL, the id logged, SQLite unseen."""
    server = broken
    channel = open_channel(server.urls[0])
    with caplog.at_level(logging.ERROR, logger="sigwire.server"):
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub(channel).Send(to_pb(envelope(client_identity, "echo", b"x")))

            async def drain() -> None:
                async for _ in stub(channel).SendStream(
                    to_pb(envelope(client_identity, "count", b"3"))
                ):
                    pass

            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await drain()
    for caught in (unary.value, streamed.value):
        failure = rpc_failure(caught)
        assert failure.code == grpc.StatusCode.INTERNAL
        assert failure.info.reason == "INTERNAL"
        error_id = failure.info.metadata["error_id"]
        assert ERROR_ID.fullmatch(error_id)
        assert error_id in failure.message
        _check_hidden(failure.message, dict(failure.info.metadata))
        _logged(caplog, error_id)


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_a_request_on_a_stream_is_answered_internal_not_left_hanging(
    broken: sigwire.Server,
    client_identity: sigwire.Identity,
    caplog: pytest.LogCaptureFixture,
    transport: str,
) -> None:
    """On a Connect stream a failing store answers INTERNAL (signed), and the stream serves on."""
    server = broken
    url = server.urls[0 if transport == "grpc" else 1]
    with caplog.at_level(logging.ERROR, logger="sigwire.server"):
        async with (
            asyncio.timeout(TIMEOUT),
            sigwire.connect(
                url, identity=client_identity, expect_did=server.identity.did, learn_endpoints=False
            ) as peer,
        ):
            for _ in range(2):
                with pytest.raises(sigwire.InternalError) as caught:
                    await peer.request("echo", b"x", timeout=TIMEOUT)
                error = caught.value
                assert error.remote
                assert ERROR_ID.fullmatch(error.error_id)
                _check_hidden(error.message, error.details)
                _logged(caplog, error.error_id)


async def test_the_same_envelope_is_answered_once_the_store_is_mended(
    broken: sigwire.Server,
    open_channel: OpenChannel,
    probe: Probe,
    client_identity: sigwire.Identity,
) -> None:
    """A request refused INTERNAL ran nothing and holds no nonce: re-sent later, it runs once."""
    server = broken
    channel = open_channel(server.urls[0])
    request = envelope(client_identity, "echo", b"later")
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub(channel).Send(to_pb(request))
        assert probe.calls["echo"] == 0
        mend(server)
        answer = _proto.reply_from_pb(await stub(channel).Send(to_pb(request)))
    assert answer.data == b"later"
    assert probe.calls["echo"] == 1
