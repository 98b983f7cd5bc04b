"""The server side of scripts/bench, run in its own process.

    python scripts/_bench_server.py {raw-grpc,raw-ws,sigwire} [--uvloop] [--profile FILE]

Binds 127.0.0.1 on free ports, prints ONE JSON line on stdout (``pid`` and
where it listens), then serves until stdin reaches EOF (the bench closes it,
or dies), SIGTERM/SIGINT, or ``--lifetime`` seconds, whichever comes first.

Modes:
    raw-grpc  grpc.aio, no sigwire code: ``/bench.Echo/Unary`` (unary echo) and
              ``/bench.Echo/Stream`` (bidirectional echo), bytes in and out
              through a generic handler.
    raw-ws    websockets, no sigwire code: binary echo, compression off.
    sigwire   a sigwire.Server (gRPC and WebSocket) with an ``echo`` handler.
              The per-sender rate limit is off (``Limits(rate=None)``): the
              bench measures the transport, and the default 2000/s per sender
              would refuse a single client driving it harder.

``--profile FILE`` runs the event loop thread under cProfile and writes the
stats to FILE on exit (read them with ``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

_UNARY = "Unary"
_STREAM = "Stream"
_SERVICE = "bench.Echo"


def _identity(data: bytes) -> bytes:
    return data


async def _raw_grpc() -> tuple[dict[str, Any], Any]:
    import grpc
    import grpc.aio

    eof = grpc.aio.EOF  # type: ignore[attr-defined]

    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def stream(
        request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        # The read()/write() style, as sigwire's Connect handler uses.
        while True:
            message = await context.read()
            if message is eof:
                return
            await context.write(message)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handlers = {
        _UNARY: grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=_identity, response_serializer=_identity
        ),
        _STREAM: grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=_identity, response_serializer=_identity
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def stop() -> None:
        await server.stop(0.5)

    return {"address": f"127.0.0.1:{port}"}, stop


async def _raw_ws() -> tuple[dict[str, Any], Any]:
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            async for message in ws:
                await ws.send(message)

    server = await serve(echo, "127.0.0.1", 0, compression=None, max_size=2**22, ping_interval=None)
    port = next(iter(server.sockets)).getsockname()[1]

    async def stop() -> None:
        server.close(close_connections=True)
        with contextlib.suppress(Exception):
            await server.wait_closed()

    return {"url": f"ws://127.0.0.1:{port}"}, stop


async def _sigwire() -> tuple[dict[str, Any], Any]:
    import sigwire

    server = sigwire.Server(
        sigwire.Identity.generate(),
        grpc="127.0.0.1:0",
        ws="127.0.0.1:0",
        name="bench",
        limits=sigwire.Limits(rate=None),
    )

    @server.on("echo")
    async def echo(msg: sigwire.Message) -> bytes:
        return msg.payload

    await server.start()

    async def stop() -> None:
        await server.stop(grace=0.5)

    grpc_url, ws_url = server.urls
    return {"grpc": grpc_url, "ws": ws_url, "did": server.identity.did}, stop


_MODES = {"raw-grpc": _raw_grpc, "raw-ws": _raw_ws, "sigwire": _sigwire}


async def _serve(mode: str, lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)

    def stdin_readable() -> None:
        # EOF (or anything at all) on stdin means the bench is done with us.
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sys.stdin.fileno())
            done.set()

    info, stop = await _MODES[mode]()
    loop.add_reader(sys.stdin.fileno(), stdin_readable)
    print(json.dumps({"pid": os.getpid(), "mode": mode, **info}), flush=True)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(lifetime):
                await done.wait()
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=sorted(_MODES))
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats here on exit")
    parser.add_argument(
        "--lifetime", type=float, default=3600.0, help="exit after this many seconds at most"
    )
    args = parser.parse_args()
    loop_factory = None
    if args.uvloop:
        loop_factory = importlib.import_module("uvloop").new_event_loop
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(args.mode, args.lifetime))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
