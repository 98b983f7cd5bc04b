"""A sigwire agent process whose memory and event loop a test watches from outside.

    python -m tests.hostile.probed_agent

Serves ``echo`` on gRPC and WebSocket at 127.0.0.1:0 (heartbeat every 0.2 s, a
peer silent for 1 s is dead) and prints ``ready GRPC_URL WS_URL DID``. A probe
task keeps polling the loop every 5 ms; each line ``gap`` read on stdin is
answered ``gap MS``: the longest the loop went without running the probe since
the previous ``gap`` line. A line ``hold SECONDS`` keeps the loop busy that
long, then answers ``held``. The test reads the process's RSS from
``/proc/PID/status``, so that the attacking client's own memory is not counted.
"""

from __future__ import annotations

import asyncio
import sys
import time

import sigwire


def _hold(seconds: float) -> None:
    # Keeps the loop as a handler that never awaits, or a slow C call, would:
    # the loop, not any peer, is late.
    time.sleep(seconds)


async def main() -> None:
    server = sigwire.Server(
        sigwire.Identity.generate(),
        grpc="127.0.0.1:0",
        ws="127.0.0.1:0",
        session=sigwire.SessionOptions(heartbeat=0.2, heartbeat_timeout=1.0),
    )

    @server.on("echo")
    async def echo(msg: sigwire.Message) -> bytes:
        return msg.payload

    await server.start()
    longest = 0.0

    async def probe() -> None:
        nonlocal longest
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    probing = asyncio.create_task(probe())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", *server.urls, server.identity.did, flush=True)
    while line := await reader.readline():
        command, *args = line.decode().split()
        if command == "gap":
            print(f"gap {longest * 1000:.1f}", flush=True)
            longest = 0.0
        elif command == "hold":
            _hold(float(args[0]))
            print("held", flush=True)
    probing.cancel()
    await server.stop(grace=0)


if __name__ == "__main__":
    asyncio.run(main())
