"""The agent process of scripts/loadtest: serves gRPC + WebSocket with a store.

Every handler run appends ``<sender> <id>`` to the run log before answering,
so the load test can count what ran, and how often, across restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import AsyncIterator

import sigwire


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--ws", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()

    log = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    server = sigwire.Server(
        sigwire.Identity.load(args.key),
        grpc=f"127.0.0.1:{args.grpc}",
        ws=f"127.0.0.1:{args.ws}",
        store=args.store,
        limits=sigwire.Limits(rate=None),
    )

    def ran(msg: sigwire.Message) -> None:
        # One write(2) per line: O_APPEND keeps lines whole.
        os.write(log, f"{msg.sender} {msg.id}\n".encode())

    @server.on("work")
    async def work(msg: sigwire.Message) -> bytes:
        ran(msg)
        return msg.payload

    @server.on("parts")
    async def parts(msg: sigwire.Message) -> AsyncIterator[bytes]:
        ran(msg)
        for i in range(3):
            yield b"%d" % i

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await server.start()
    print("ready", flush=True)
    await stop.wait()
    await server.stop(grace=10)
    os.close(log)


if __name__ == "__main__":
    asyncio.run(main())
