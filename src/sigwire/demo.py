"""The main job: two agents on loopback holding a real signed conversation.

Run with ``sigwire demo``. A server agent and a client agent, each with its
own Ed25519 identity, exchange a request, a streamed answer, and a push that
the client answers; every message is signed and verified on arrival.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from sigwire.client import connect
from sigwire.envelope import Message
from sigwire.server import Server
from sigwire.signing import Identity

__all__ = ["add_builtin_handlers", "run_demo"]


def add_builtin_handlers(server: Server) -> None:
    """Register ``echo`` (returns the payload) and ``count`` (streams 0..N-1)."""

    @server.on("echo")
    async def echo(msg: Message) -> bytes:
        return msg.payload

    @server.on("count")
    async def count(msg: Message) -> AsyncIterator[str]:
        try:
            n = int(msg.payload or b"3")
        except ValueError:
            from sigwire.errors import ApplicationError

            raise ApplicationError("count takes a decimal number", reason="BAD_NUMBER") from None
        for i in range(min(n, 10_000)):
            yield str(i)


async def run_demo(say: Callable[[str], None] = print) -> None:
    """Run the conversation, narrating it through ``say``."""
    alice = Identity.generate()
    bob = Identity.generate()
    server = Server(alice, grpc="127.0.0.1:0", ws="127.0.0.1:0", name="alice")
    add_builtin_handlers(server)

    @server.on("task.create")
    async def create(msg: Message) -> str:
        return f"task accepted from {msg.sender[:24]}...: {msg.text()}"

    async with server:
        say(f"alice {alice.did}")
        say(f"      serving {', '.join(server.urls)}")
        say(f"bob   {bob.did}")
        for url in server.urls:
            async with connect(url, identity=bob, expect_did=alice.did) as peer:

                @peer.on("review")
                async def review(msg: Message) -> str:
                    return f"bob approves {msg.text()!r}"

                say(f"\n-- over {url}")
                reply = await peer.request("task.create", "write the report", timeout=5)
                say(f"bob -> alice  task.create  => {reply.data.decode()}")
                say(f"              reply signed by {reply.responder[:32]}... (verified)")
                parts = [part.data.decode() async for part in peer.stream("count", b"5")]
                say(f"bob -> alice  count 5      => streamed {parts}")
                pushed = await server.push(bob.did, "review", b"draft v1", timeout=5)
                say(f"alice -> bob  review push  => {pushed.data.decode()}")
                say(f"              reply signed by {pushed.responder[:32]}... (verified)")
    say("\nevery message above was Ed25519-signed by its sender and verified by its receiver")


def main() -> None:
    """Entry point for ``python -m sigwire.demo``."""
    asyncio.run(run_demo())


if __name__ == "__main__":
    main()
