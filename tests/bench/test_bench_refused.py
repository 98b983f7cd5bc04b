"""The bench's Send rows send a refused call again, and nothing else."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
import pytest

import sigwire

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench"


def _bench() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("sigwire_bench_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up by name while they are made.
    sys.modules[loader.name] = module
    try:
        loader.exec_module(module)
    finally:
        del sys.modules[loader.name]
    return module


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, debug_error_string=details
    )


REFUSED = "Stream removed (RST_STREAM (Received RST_STREAM with error code 7))"


class _Failing:
    """A channel whose Send fails with ``errors`` first, then goes to the real server."""

    def __init__(self, channel: grpc.aio.Channel, errors: list[grpc.aio.AioRpcError]) -> None:
        self.channel = channel
        self.errors = errors
        self.requests: list[bytes] = []

    def unary_unary(self, method: str, **kwargs: Any) -> Callable[[bytes], Any]:
        real = self.channel.unary_unary(method, **kwargs)

        async def send(request: bytes) -> bytes:
            self.requests.append(request)
            if self.errors:
                raise self.errors.pop(0)
            reply: bytes = await real(request)
            return reply

        return send


async def test_a_refused_send_is_sent_again_unchanged() -> None:
    bench = _bench()
    server = sigwire.Server(sigwire.Identity.generate(), grpc="127.0.0.1:0")

    @server.on("echo")
    async def echo(msg: sigwire.Message) -> bytes:
        return msg.payload

    async with server:
        channel = grpc.aio.insecure_channel(server.urls[0].removeprefix("grpc://"))
        async with channel:
            refused = _Failing(channel, [_error(grpc.StatusCode.UNAVAILABLE, REFUSED)] * 2)
            await bench._send_rpc(refused, server.identity.did)()
            assert bench.REFUSED[0] == 2
            # The very same signed envelope each time: the server never saw it.
            assert len(refused.requests) == 3
            assert len(set(refused.requests)) == 1

            other = _Failing(channel, [_error(grpc.StatusCode.UNAVAILABLE, "Connection reset")])
            with pytest.raises(grpc.aio.AioRpcError):
                await bench._send_rpc(other, server.identity.did)()
            assert len(other.requests) == 1

            stubborn = _Failing(
                channel, [_error(grpc.StatusCode.UNAVAILABLE, REFUSED)] * bench.REFUSED_ATTEMPTS
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await bench._send_rpc(stubborn, server.identity.did)()
            assert len(stubborn.requests) == bench.REFUSED_ATTEMPTS
            # Counted as re-sent: every attempt but the last, which fails the call.
            assert bench.REFUSED[0] == 2 + bench.REFUSED_ATTEMPTS - 1

            # An UNAVAILABLE from sigwire itself (it carries status details) is
            # not grpc's refusal, whatever its text says.
            sigwire_says = grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(("grpc-status-details-bin", b"\x08\x0e")),
                REFUSED,
                debug_error_string=REFUSED,
            )
            draining = _Failing(channel, [sigwire_says])
            with pytest.raises(grpc.aio.AioRpcError):
                await bench._send_rpc(draining, server.identity.did)()
            assert len(draining.requests) == 1
