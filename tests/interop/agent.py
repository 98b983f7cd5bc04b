"""A sigwire agent for the Node interop clients: echo, count, and a push to each client.

    python tests/interop/agent.py

Serves gRPC and WebSocket on 127.0.0.1 (free ports) with the handlers ``echo``
(returns the payload) and ``count`` (streams ``"0"`` ... ``str(n - 1)``), and
prints one JSON line ``{"grpc": URL, "ws": URL, "did": DID}``. Every agent that
opens a Connect stream then gets one push of kind ``ask`` with payload
``question``; when its signed reply verifies (``Server.push`` checks the
signature and the binding) and says ``answer: question``, the agent prints
``push ok DID``, otherwise ``push failed DID: ERROR``. It stops when its
standard input closes, or on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator

import sigwire

POLL_INTERVAL = 0.05
PUSH_TIMEOUT = 10.0 * float(os.environ.get("SIGWIRE_TEST_TIMEOUT_SCALE", "1"))


def say(line: str) -> None:
    print(line, flush=True)


async def ask(server: sigwire.Server, did: str) -> None:
    try:
        reply = await server.push(did, "ask", b"question", timeout=PUSH_TIMEOUT)
    except sigwire.SigwireError as exc:
        say(f"push failed {did}: {exc}")
        return
    if reply.data == b"answer: question":
        say(f"push ok {did}")
    else:
        say(f"push failed {did}: unexpected answer {reply.data!r}")


async def push_to_newcomers(server: sigwire.Server) -> None:
    # Server has no "agent connected" callback; connected() lists the DIDs of
    # open Connect streams, so poll it.
    seen: set[str] = set()
    async with asyncio.TaskGroup() as pushes:
        while True:
            for did in server.connected():
                if did not in seen:
                    seen.add(did)
                    pushes.create_task(ask(server, did))
            await asyncio.sleep(POLL_INTERVAL)


def watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` once standard input reaches end of file."""

    def read() -> None:
        # A thread, not the event loop: epoll refuses regular files and /dev/null.
        # os.read, not sys.stdin: a daemon thread blocked on a buffered reader's
        # lock aborts the interpreter at exit.
        while os.read(sys.stdin.fileno(), 4096):
            pass
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read, name="stdin", daemon=True).start()


async def main() -> None:
    server = sigwire.Server(sigwire.Identity.generate(), grpc="127.0.0.1:0", ws="127.0.0.1:0")

    @server.on("echo")
    async def echo(msg: sigwire.Message) -> bytes:
        return msg.payload

    @server.on("count")
    async def count(msg: sigwire.Message) -> AsyncIterator[str]:
        for i in range(int(msg.payload)):
            yield str(i)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watch_stdin(loop, stop)

    async with server:
        grpc_url, ws_url = server.urls
        say(json.dumps({"grpc": grpc_url, "ws": ws_url, "did": server.identity.did}))
        pusher = asyncio.create_task(push_to_newcomers(server))
        try:
            await stop.wait()
        finally:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pusher


if __name__ == "__main__":
    asyncio.run(main())
