"""Chaos: cuts, resets, latency, partitions and SIGKILL, over gRPC and WebSocket.

Every test drives real servers through a fault-injecting TCP proxy the test
controls, and checks that every accepted message reaches its handler exactly
once and that clients recover by themselves.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import sigwire
from tests.chaos.conftest import TRANSPORTS
from tests.conftest import TIMEOUT
from tests.integration.helpers import FAST_BACKOFF, TcpProxy


class Agent:
    """A server whose handlers count every run, with a gate the test opens."""

    def __init__(self, **options: object) -> None:
        self.server = sigwire.Server(
            sigwire.Identity.generate(), grpc="127.0.0.1:0", ws="127.0.0.1:0", **options
        )
        self.runs: collections.Counter[bytes] = collections.Counter()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

        @self.server.on("work")
        async def work(msg: sigwire.Message) -> bytes:
            self.runs[msg.payload] += 1
            self.entered.set()
            await self.gate.wait()
            return b"done " + msg.payload

        @self.server.on("parts")
        async def parts(msg: sigwire.Message) -> AsyncIterator[bytes]:
            self.runs[msg.payload] += 1
            for i in range(int(msg.payload)):
                if i == 2:
                    self.entered.set()
                    await self.gate.wait()
                yield str(i).encode()

    def url(self, transport: str) -> str:
        return self.server.urls[TRANSPORTS.index(transport)]


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    agent = Agent()
    await agent.server.start()
    yield agent
    agent.gate.set()
    async with asyncio.timeout(TIMEOUT):
        await agent.server.stop(grace=0)


def via(proxy: TcpProxy, transport: str) -> str:
    return proxy.url if transport == "grpc" else proxy.ws_url


def connect(proxy: TcpProxy, transport: str, **options: object) -> object:
    return sigwire.connect(
        via(proxy, transport), backoff=FAST_BACKOFF, learn_endpoints=False, **options
    )


async def test_cut_mid_request_runs_the_handler_once(
    agent: Agent, proxy: TcpProxy, transport: str
) -> None:
    """A request whose connection is cut while its handler runs completes, run once."""
    agent.gate.clear()
    async with asyncio.timeout(TIMEOUT), connect(proxy, transport) as peer:  # type: ignore[attr-defined]
        pending = asyncio.create_task(peer.request("work", b"a"))
        await agent.entered.wait()
        proxy.cut()
        agent.gate.set()
        reply = await pending
        assert peer.reconnects >= 1
    assert reply.data == b"done a"
    assert agent.runs == {b"a": 1}


async def test_cut_mid_stream_delivers_every_part_once(
    agent: Agent, proxy: TcpProxy, transport: str
) -> None:
    """A streamed answer cut after two parts arrives whole, in order, without repeats."""
    agent.gate.clear()
    async with asyncio.timeout(TIMEOUT), connect(proxy, transport) as peer:  # type: ignore[attr-defined]
        received: list[bytes] = []

        async def consume() -> None:
            async for part in peer.stream("parts", b"6"):
                received.append(part.data)

        consuming = asyncio.create_task(consume())
        await agent.entered.wait()
        proxy.cut()
        agent.gate.set()
        await consuming
    assert received == [b"0", b"1", b"2", b"3", b"4", b"5"]
    assert agent.runs == {b"6": 1}


async def test_resets_under_load_lose_and_double_nothing(
    agent: Agent, proxy: TcpProxy, transport: str
) -> None:
    """100 requests in flight through two RSTs all complete; each handler ran exactly once."""
    agent.gate.clear()
    async with asyncio.timeout(TIMEOUT), connect(proxy, transport) as peer:  # type: ignore[attr-defined]
        pending = [asyncio.create_task(peer.request("work", str(i).encode())) for i in range(100)]
        await agent.entered.wait()
        proxy.reset()
        agent.gate.set()
        await asyncio.sleep(0)
        proxy.reset()
        replies = await asyncio.gather(*pending)
    assert [r.data for r in replies] == [b"done " + str(i).encode() for i in range(100)]
    assert set(agent.runs.values()) == {1}
    assert len(agent.runs) == 100


async def test_requests_complete_through_added_latency(
    agent: Agent, proxy: TcpProxy, transport: str
) -> None:
    """With 30 ms added per chunk each way, requests and streams still complete."""
    proxy.latency = 0.03
    async with asyncio.timeout(TIMEOUT), connect(proxy, transport) as peer:  # type: ignore[attr-defined]
        replies = await asyncio.gather(*(peer.request("work", b"%d" % i) for i in range(20)))
        parts = [p.data async for p in peer.stream("parts", b"3")]
    assert len(replies) == 20
    assert parts == [b"0", b"1", b"2"]


async def test_heartbeat_detects_a_partition_and_the_client_recovers(
    agent: Agent, proxy: TcpProxy, transport: str
) -> None:
    """A black-holed link is declared dead within the heartbeat timeout, then recovers."""
    options = sigwire.SessionOptions(heartbeat=0.1, heartbeat_timeout=0.4)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT), connect(proxy, transport, session=options) as peer:  # type: ignore[attr-defined]
        assert (await peer.request("work", b"before")).data == b"done before"
        session = peer._session
        assert session is not None
        started = loop.time()
        proxy.black_hole()
        await session.closed.wait()
        detected = loop.time() - started
        assert session.error is not None
        assert session.error.reason == "HEARTBEAT_TIMEOUT"
        proxy.resume()
        proxy.cut()  # drop the half-dead sockets so that reconnection dials afresh
        assert (await peer.request("work", b"after")).data == b"done after"
    # Detection is bounded by the heartbeat settings, with slack for a busy machine.
    assert detected < options.heartbeat_timeout + options.heartbeat + 1.0
    assert agent.runs == {b"before": 1, b"after": 1}


async def test_stop_never_hangs_with_partitioned_clients(
    agent: Agent, proxy: TcpProxy, transport: str
) -> None:
    """Stopping the server while its clients' links are black-holed finishes in bounded time."""
    peers = [connect(proxy, transport) for _ in range(5)]
    async with asyncio.timeout(TIMEOUT):
        opened = [await p.__aenter__() for p in peers]  # type: ignore[attr-defined]
        agent.gate.clear()
        pending = [asyncio.create_task(p.request("work", b"x%d" % i)) for i, p in enumerate(opened)]
        await agent.entered.wait()
        proxy.black_hole()
        await agent.server.stop(grace=0.2)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for p in peers:
            await p.__aexit__(None, None, None)  # type: ignore[attr-defined]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_agent(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.pusher_agent", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ},
    )


async def test_sigkilled_server_delivers_accepted_pushes_after_restart(
    tmp_path: Path, transport: str
) -> None:
    """Pushes accepted before SIGKILL reach the agent once each, in order, after a restart."""
    store, key = tmp_path / "agent.db", tmp_path / "agent.pem"
    sigwire.Identity.generate().save(key)
    client = sigwire.Identity.generate()
    ports = [str(_free_port()), str(_free_port())]
    first = _start_agent([str(store), *ports, client.did, "10", str(key)])
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "ready"
    assert first.stdout.readline().strip() == "accepted 10"
    first.send_signal(signal.SIGKILL)
    first.wait(TIMEOUT)
    first.stdout.close()

    second = _start_agent([str(store), *ports, client.did, "0", str(key)])
    try:
        assert second.stdout is not None
        assert second.stdout.readline().strip() == "ready"
        url = (
            f"grpc://127.0.0.1:{ports[0]}"
            if transport == "grpc"
            else f"ws://127.0.0.1:{ports[1]}/sigwire/v1"
        )
        seen: list[bytes] = []
        done = asyncio.Event()
        connection = sigwire.connect(url, identity=client, learn_endpoints=False)

        # Registered before connecting: the queued pushes arrive right after the hello.
        @connection.on("ask")
        async def ask(msg: sigwire.Message) -> bytes:
            seen.append(msg.payload)
            if len(seen) == 10:
                done.set()
            return b"ok"

        async with asyncio.timeout(TIMEOUT), connection:
            await done.wait()
        assert seen == [str(i).encode() for i in range(10)]
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait(TIMEOUT)
        if second.stdout is not None:
            second.stdout.close()
