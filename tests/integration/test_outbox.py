"""Lossless pushes: the per-agent outbox, in memory and in SQLite across restarts."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

import sigwire
from sigwire.store import SqliteStore
from tests.conftest import TIMEOUT
from tests.integration.conftest import MakeProxy, MakeServer
from tests.integration.helpers import FAST_BACKOFF


async def test_pushes_to_an_offline_agent_arrive_in_order_when_it_connects(
    make_server: MakeServer, client_identity: sigwire.Identity
) -> None:
    """Pushes queued for an absent agent are all delivered, in order, once it connects."""
    server = await make_server()
    seen: list[bytes] = []
    async with asyncio.timeout(TIMEOUT):
        pushes = []
        for i in range(20):
            pushes.append(
                asyncio.create_task(
                    server.push(client_identity.did, "ask", str(i).encode(), timeout=TIMEOUT)
                )
            )
            await asyncio.sleep(0)  # each push enters the outbox before the next
        assert len(server._outboxes[client_identity.did]) == 20
        connection = sigwire.connect(
            server.urls[0], identity=client_identity, learn_endpoints=False
        )

        @connection.on("ask")
        async def ask(msg: sigwire.Message) -> bytes:
            seen.append(msg.payload)
            return b"ok " + msg.payload

        async with connection:
            replies = await asyncio.gather(*pushes)
    assert seen == [str(i).encode() for i in range(20)]
    assert [r.data for r in replies] == [b"ok " + str(i).encode() for i in range(20)]
    assert server._outboxes == {}


async def test_push_cut_mid_handler_is_redelivered_and_runs_once(
    make_server: MakeServer, make_proxy: MakeProxy, client_identity: sigwire.Identity
) -> None:
    """A push whose stream is cut while its handler runs still gets one answer, from one run."""
    server = await make_server()
    proxy = await make_proxy(server.urls[0])
    entered, gate = asyncio.Event(), asyncio.Event()
    runs = 0
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(
            proxy.url, identity=client_identity, backoff=FAST_BACKOFF, learn_endpoints=False
        ) as peer:

            @peer.on("ask")
            async def ask(msg: sigwire.Message) -> bytes:
                nonlocal runs
                runs += 1
                entered.set()
                await gate.wait()
                return b"answered"

            pushing = asyncio.create_task(server.push(client_identity.did, "ask", timeout=TIMEOUT))
            await entered.wait()
            proxy.cut()
            gate.set()
            reply = await pushing
    assert reply.data == b"answered"
    assert runs == 1
    assert peer.reconnects >= 1


async def test_a_full_outbox_refuses_the_next_push(make_server: MakeServer) -> None:
    """Past Limits.outbox_size pushes waiting for one agent, push fails at once."""
    server = await make_server(limits=sigwire.Limits(outbox_size=2))
    absent = sigwire.Identity.generate().did
    async with asyncio.timeout(TIMEOUT):
        waiting = [
            asyncio.create_task(server.push(absent, "ask", timeout=TIMEOUT)) for _ in range(2)
        ]
        await asyncio.sleep(0)
        with pytest.raises(sigwire.OverloadedError):
            await server.push(absent, "ask", timeout=TIMEOUT)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_stored_push_survives_a_restart(
    make_server: MakeServer, client_identity: sigwire.Identity, tmp_path: Path
) -> None:
    """A push accepted before a stop is delivered by the next server on the same store."""
    path = tmp_path / "agent.db"
    first = await make_server(store=path)
    async with asyncio.timeout(TIMEOUT):
        pushing = asyncio.create_task(
            first.push(client_identity.did, "ask", b"from before", timeout=TIMEOUT)
        )
        await asyncio.sleep(0)
        await first.stop(grace=0)
        with pytest.raises(sigwire.ShuttingDownError):
            await pushing
        with contextlib.closing(SqliteStore(path)) as store:
            assert [did for did, _, _ in store.pending_pushes()] == [client_identity.did]

        second = await make_server(store=path)
        got = asyncio.Event()
        connection = sigwire.connect(
            second.urls[0], identity=client_identity, learn_endpoints=False
        )

        @connection.on("ask")
        async def ask(msg: sigwire.Message) -> bytes:
            assert msg.payload == b"from before"
            got.set()
            return b"late but here"

        async with connection as peer:
            await got.wait()
            # Frames are read in order: once this echo is answered, the server
            # has taken the push's reply, which retires it.
            assert (await peer.request("echo", b"after")).data == b"after"
    assert second._outboxes == {}
    assert second.store is not None
    assert second.store.pending_pushes() == []


async def test_stored_answer_survives_a_restart(
    make_server: MakeServer, client_identity: sigwire.Identity, tmp_path: Path
) -> None:
    """A request re-sent after a restart is answered from the store, not run again."""
    path = tmp_path / "agent.db"
    runs = 0

    async def count_runs(server: sigwire.Server) -> None:
        @server.on("once")
        async def once(msg: sigwire.Message) -> bytes:
            nonlocal runs
            runs += 1
            return b"ran %d" % runs

    envelope = client_identity.sign_envelope(
        sigwire.Envelope.new("once", b"", sender=client_identity.did)
    )
    first = await make_server(store=path)
    await count_runs(first)
    async with asyncio.timeout(TIMEOUT):
        before = [r async for r in first.dispatcher.dispatch(envelope)]
        await first.stop(grace=0)
        second = await make_server(store=path)
        await count_runs(second)
        after = [r async for r in second.dispatcher.dispatch(envelope)]
    assert runs == 1
    assert [r.data for r in after] == [r.data for r in before] == [b"ran 1"]
    assert after[0].signature == before[0].signature


async def test_deliveries_to_many_agents_leave_no_lock_behind(make_server: MakeServer) -> None:
    """Pushes to 200 absent DIDs and to 10 connected agents leave no per-DID delivery state."""
    server = await make_server()
    absent = [sigwire.Identity.generate().did for _ in range(200)]
    agents = [sigwire.Identity.generate() for _ in range(10)]
    async with asyncio.timeout(TIMEOUT):
        expired = await asyncio.gather(
            *(server.push(did, "ask", b"anyone?", timeout=0.05) for did in absent),
            return_exceptions=True,
        )
        assert all(isinstance(e, sigwire.PushExpiredError) for e in expired)
        for agent in agents:
            connection = sigwire.connect(server.urls[0], identity=agent, learn_endpoints=False)

            @connection.on("ask")
            async def ask(msg: sigwire.Message) -> bytes:
                return b"ok " + msg.payload

            async with connection:
                reply = await server.push(agent.did, "ask", b"you", timeout=TIMEOUT)
                assert reply.data == b"ok you"
    assert server._delivering == {}
    assert server._outboxes == {}
