"""Streamed answers nobody reads, and handlers that never wait, against a real server.

A peer asks for long streamed answers (the built-in ``count``, whose generator
never awaits) and reads nothing: the handlers must be held back instead of
growing the answers, and must not hold the event loop while they run. Memory
is process RSS from ``/proc/self/status`` (protobuf's and grpc's C allocations
included); stalls are the largest gap seen by a task that keeps sleeping 5 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc.aio
import pytest
from websockets.asyncio.client import connect as ws_connect

import sigwire
from sigwire import _proto
from sigwire.demo import add_builtin_handlers
from sigwire.dispatch import reply_cost
from sigwire.transports.memory import DEFAULT_HUB
from tests.conftest import TIMEOUT
from tests.hostile.conftest import PROTO, frame_bytes, raw_connect, signed
from tests.servers import LOCAL

MiB = 1024 * 1024
Writer = Callable[[bytes], Awaitable[None]]


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class StallProbe:
    """The largest delay, beyond what it asked for, of a task that keeps sleeping 5 ms."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, time.perf_counter() - started - 0.005)


@contextlib.asynccontextmanager
async def probing() -> AsyncIterator[StallProbe]:
    """A StallProbe running for the duration of the block."""
    probe = StallProbe()
    task = asyncio.create_task(probe.run())
    await asyncio.sleep(0)  # the probe is polling before the block starts
    try:
        yield probe
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def builtin_server(limits: sigwire.Limits) -> AsyncIterator[sigwire.Server]:
    """A gRPC + WebSocket server on 127.0.0.1:0 with the built-in ``echo`` and ``count``."""
    server = sigwire.Server(sigwire.Identity.generate(), grpc=LOCAL, ws=LOCAL, limits=limits)
    add_builtin_handlers(server)
    await server.start()
    try:
        yield server
    finally:
        async with asyncio.timeout(TIMEOUT):
            await server.stop(grace=0)


def _counts(me: sigwire.Identity, n: int, payload: bytes = b"10000") -> list[sigwire.Envelope]:
    return [signed(me, "count", payload) for _ in range(n)]


async def _until_started(
    server: sigwire.Server, peer: sigwire.Peer, answers: int, before: int
) -> None:
    """Echo through ``peer`` until the cache holds ``answers`` more entries than ``before``.

    Each echo adds one entry of its own, which is not counted.
    """
    echoes = 0
    while len(server.dispatcher.cache) - before - echoes < answers:
        await _echoes(peer, 1)
        echoes += 1


async def _echoes(peer: sigwire.Peer, n: int) -> None:
    for i in range(n):
        reply = await peer.request("echo", b"%d" % i, timeout=TIMEOUT)
        assert reply.data == b"%d" % i


async def test_long_streams_nobody_reads_grow_the_server_by_less_than_its_cache_bytes(
    client_identity: sigwire.Identity,
) -> None:
    """200 ``count 10000`` on a stream that reads nothing: RSS grows under cache bytes + 64 MiB."""
    cache_bytes = 16 * MiB
    limits = sigwire.Limits(reply_cache_bytes=cache_bytes, rate=None)
    async with builtin_server(limits=limits) as server:
        authority = server.urls[0].removeprefix("grpc://")
        channel = grpc.aio.insecure_channel(authority)
        try:
            async with (
                asyncio.timeout(TIMEOUT * 3),
                sigwire.connect(server.urls[0], learn_endpoints=False) as healthy,
            ):
                await _echoes(healthy, 20)
                before, cached = rss(), len(server.dispatcher.cache)
                call = raw_connect(channel)
                counts = _counts(client_identity, 200)
                await call.write(frame_bytes(100, *counts[:100]))
                await call.write(frame_bytes(200, *counts[100:]))
                await _until_started(server, healthy, 200, cached)  # every count has started
                await _echoes(healthy, 50)
                grown = rss() - before
                # The reader is gone: its answers stay held back, they do not run on.
                call.cancel()
                await _echoes(healthy, 50)
                gone = rss() - before
        finally:
            await channel.close(grace=None)
    bound = cache_bytes + 64 * MiB
    assert grown < bound, f"RSS grew {grown / MiB:.0f} MiB while nothing was read"
    assert gone < bound, f"RSS grew {gone / MiB:.0f} MiB once the reader left"


@contextlib.asynccontextmanager
async def unread_stream(server: sigwire.Server, transport: str) -> AsyncIterator[Writer]:
    """``write(frame)`` on a raw Connect stream over ``transport`` that never reads."""
    if transport == "grpc":
        channel = grpc.aio.insecure_channel(server.urls[0].removeprefix("grpc://"))
        call = raw_connect(channel)
        try:
            yield call.write
        finally:
            call.cancel()
            await channel.close(grace=None)
    else:
        # Closed at once on the way out: a peer that reads nothing would
        # never read the server's close frame behind what it was sent.
        async with ws_connect(server.urls[1], subprotocols=[PROTO], close_timeout=0) as ws:
            yield ws.send


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_a_frame_of_long_streams_does_not_stall_the_loop(
    client_identity: sigwire.Identity, transport: str
) -> None:
    """One frame of 100 ``count 10000``, never read: the loop never stalls a second."""
    async with builtin_server(limits=sigwire.Limits(rate=None)) as server:
        url = server.urls[0 if transport == "grpc" else 1]
        async with (
            asyncio.timeout(TIMEOUT * 3),
            sigwire.connect(url, learn_endpoints=False) as healthy,
            unread_stream(server, transport) as write,
        ):
            await _echoes(healthy, 5)
            async with probing() as probe:
                cached = len(server.dispatcher.cache)
                await write(frame_bytes(100, *_counts(client_identity, 100)))
                await _until_started(server, healthy, 100, cached)
                await _echoes(healthy, 20)
    # Run whole inside the frame reader, the counts held the loop for ~8 s.
    assert probe.worst < 1.0, f"the loop stalled {probe.worst * 1000:.0f} ms"


async def test_the_writer_lets_the_loop_run_every_few_frames(
    client_identity: sigwire.Identity,
) -> None:
    """Over a transport that never makes it wait, one turn of the loop writes a few frames."""
    name = f"unread-{uuid.uuid4().hex}"
    server = sigwire.Server(
        sigwire.Identity.generate(), memory=name, limits=sigwire.Limits(rate=None)
    )
    add_builtin_handlers(server)
    await server.start()
    try:
        listener = DEFAULT_HUB.get(name)
        assert listener is not None
        stream = listener.accept()  # the peer's end, never read: what reaches it stays
        await stream.send(frame_bytes(100, *_counts(client_identity, 100)))
        largest = seen = 0
        async with asyncio.timeout(TIMEOUT):
            while seen < 300:
                await asyncio.sleep(0)  # one turn of the loop
                written = stream._inbox.qsize() - seen
                largest, seen = max(largest, written), seen + written
    finally:
        await server.stop(grace=0)
    # Four frames of replies (each with its ack) from the writer, and one written at once;
    # unbounded, a turn wrote every reply queued, four windows of them.
    assert largest <= 10, f"{largest} frames written in one turn of the loop"


async def test_handlers_busy_before_their_first_wait_do_not_hold_the_loop_for_a_frame(
    client_identity: sigwire.Identity,
) -> None:
    """128 handlers each busy 20 ms before awaiting, in one frame: no stall of a second."""
    async with builtin_server(limits=sigwire.Limits(rate=None)) as server:

        @server.on("busy")
        async def busy(msg: sigwire.Message) -> bytes:
            until = time.perf_counter() + 0.02
            while time.perf_counter() < until:
                pass
            return b"done"

        authority = server.urls[0].removeprefix("grpc://")
        channel = grpc.aio.insecure_channel(authority)
        try:
            async with asyncio.timeout(TIMEOUT * 3):
                call = raw_connect(channel)
                envelopes = [signed(client_identity, "busy") for _ in range(128)]
                async with probing() as probe:
                    await call.write(frame_bytes(128, *envelopes))
                    answered: set[str] = set()
                    while len(answered) < 128:
                        data = await call.read()
                        assert data is not grpc.aio.EOF
                        frame = _proto.pb.Frame.FromString(data)
                        answered |= {r.request_id for r in frame.replies.replies if r.final}
                call.cancel()
        finally:
            await channel.close(grace=None)
    # Started all at once, they held the loop for 128 x 20 ms.
    assert probe.worst < 1.0, f"the loop stalled {probe.worst * 1000:.0f} ms"


async def test_a_streamed_answer_beyond_max_answer_bytes_ends_overloaded() -> None:
    """A stream whose parts outgrow ``max_answer_bytes`` stops with OVERLOADED, parts first."""
    limits = sigwire.Limits(max_answer_bytes=100 * reply_cost(_part(b"9999")))
    async with builtin_server(limits=limits) as server:
        async with (
            asyncio.timeout(TIMEOUT),
            sigwire.connect(server.urls[0], learn_endpoints=False) as peer,
        ):
            parts: list[bytes] = []

            async def read() -> None:
                async for part in peer.stream("count", b"10000", timeout=TIMEOUT):
                    parts.append(part.data)

            with pytest.raises(sigwire.OverloadedError) as caught:
                await read()
    assert 90 <= len(parts) < 100
    assert parts == [b"%d" % i for i in range(len(parts))]
    assert caught.value.details["limit"] == str(limits.max_answer_bytes)


def _part(data: bytes) -> sigwire.Reply:
    return sigwire.Reply(request_id="r", request_digest=b"", responder="d", data=data, final=False)


@contextlib.asynccontextmanager
async def _three_counts(
    server: sigwire.Server, me: sigwire.Identity
) -> AsyncIterator[tuple[Any, sigwire.Peer]]:
    """A raw Connect call whose three ``count 10000`` have started, and a healthy peer."""
    channel = grpc.aio.insecure_channel(server.urls[0].removeprefix("grpc://"))
    try:
        async with (
            asyncio.timeout(TIMEOUT),
            sigwire.connect(server.urls[0], learn_endpoints=False) as healthy,
        ):
            call = raw_connect(channel)
            await call.write(frame_bytes(1, *_counts(me, 3)))
            while len(server.dispatcher.running()) < 3:
                await _echoes(healthy, 1)
            yield call, healthy
    finally:
        await channel.close(grace=None)


async def test_draining_cancels_streams_whose_reader_has_gone(
    client_identity: sigwire.Identity,
) -> None:
    """stop() cancels handlers held back for a reader that left, not waiting out its grace."""
    async with (
        builtin_server(limits=sigwire.Limits(rate=None)) as server,
        _three_counts(server, client_identity) as (call, healthy),
    ):
        call.cancel()  # the reader leaves, its stream closes
        running = server.dispatcher._running
        while sum(entry.unread for entry in running.values()) < 3:
            await _echoes(healthy, 1)
        # A grace far beyond the test's timeout: only cancelling them ends it in time.
        async with asyncio.timeout(TIMEOUT):
            await server.stop(grace=TIMEOUT * 10)
        assert not server.dispatcher.running()


async def test_answers_in_progress_together_keep_within_reply_cache_bytes() -> None:
    """Parts already read but held by running answers count: past reply_cache_bytes, OVERLOADED."""
    part = reply_cost(_part(b"x" * 100))
    limits = sigwire.Limits(reply_cache_bytes=150 * part, rate=None)
    gate = asyncio.Event()
    server = sigwire.Server(sigwire.Identity.generate(), grpc=LOCAL, limits=limits)

    @server.on("hold")
    async def hold(msg: sigwire.Message) -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 100
        await gate.wait()  # done producing, not finished: its parts stay held

    await server.start()
    try:
        async with (
            asyncio.timeout(TIMEOUT),
            sigwire.connect(server.urls[0], learn_endpoints=False) as peer,
        ):
            first = peer.stream("hold", b"", timeout=TIMEOUT)
            read = [await anext(first) for _ in range(100)]  # every part read, none finished
            with pytest.raises(sigwire.OverloadedError) as caught:
                async for _ in peer.stream("hold", b"", timeout=TIMEOUT):
                    pass
            gate.set()
            rest = [part async for part in first]  # the first ends as it should
    finally:
        async with asyncio.timeout(TIMEOUT):
            await server.stop(grace=0)
    assert len(read) == 100
    assert rest == []  # its final part carries no data
    assert caught.value.details["limit"] == str(limits.reply_cache_bytes)
    assert server.dispatcher.in_progress_bytes == 0


async def test_draining_cancels_streams_whose_reader_leaves_during_the_drain(
    client_identity: sigwire.Identity,
) -> None:
    """A reader that leaves after the drain began frees its handlers too, well before the grace."""
    async with (
        builtin_server(limits=sigwire.Limits(rate=None)) as server,
        _three_counts(server, client_identity) as (call, _),
    ):
        stopping = asyncio.create_task(server.stop(grace=TIMEOUT * 10))
        await asyncio.sleep(0)  # stop() starts draining before its first wait
        assert not server.dispatcher.accepting
        assert len(server.dispatcher.running()) == 3  # none cancelled: still followed
        call.cancel()  # the reader leaves during the drain
        async with asyncio.timeout(TIMEOUT):
            await stopping
        assert not server.dispatcher.running()
