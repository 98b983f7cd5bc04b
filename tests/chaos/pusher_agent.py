"""A sigwire agent process for the SIGKILL test: serves with a store and queues pushes.

    python -m tests.chaos.pusher_agent STORE GRPC_PORT WS_PORT DID COUNT KEYFILE

Prints ``ready`` once serving and ``accepted N`` once N pushes to DID sit in the
store's outbox, then serves until killed.
"""

from __future__ import annotations

import asyncio
import sys

import sigwire


async def main(store: str, grpc_port: str, ws_port: str, did: str, count: int, key: str) -> None:
    server = sigwire.Server(
        sigwire.Identity.load(key),
        grpc=f"127.0.0.1:{grpc_port}",
        ws=f"127.0.0.1:{ws_port}",
        store=store,
    )
    await server.start()
    print("ready", flush=True)
    pushes = [
        asyncio.create_task(server.push(did, "ask", str(i).encode(), timeout=60))
        for i in range(count)
    ]
    for _ in range(count):
        await asyncio.sleep(0)  # each task enqueues (and stores) its push in order
    if count:
        assert server.store is not None
        stored = len(server.store.pending_pushes())
        print(f"accepted {stored}", flush=True)
    await asyncio.Event().wait()
    del pushes


if __name__ == "__main__":
    store, grpc_port, ws_port, did, count, key = sys.argv[1:7]
    asyncio.run(main(store, grpc_port, ws_port, did, int(count), key))
