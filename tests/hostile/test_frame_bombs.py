"""Frames built to cost the agent far more than the peer: refused from their size and counts.

The agent runs in a process of its own (tests/hostile/probed_agent.py), so that
its RSS, read from /proc/PID/status, counts only what the attack cost it, and a
probe task in its loop reports the longest stall.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import sys
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

import sigwire
from sigwire.session import Session
from sigwire.transports.base import FrameStream
from tests.conftest import TIMEOUT
from tests.hostile.conftest import (
    JSON,
    PROTO,
    SERVICE,
    OpenChannel,
    raw_connect,
    send_refused,
    send_stream_refused,
    write_then_read_until_error,
)
from tests.wire import varint

JSON_STALL_MS = 120
"""Bound on the loop stall while a valid ~6 MB JSON frame is converted (~190 ms of
json_format on the loop, a few ms off it)."""

ROOT = Path(__file__).resolve().parents[2]

ENVELOPES = 4_300_000
"""Empty envelopes in one bomb frame: two bytes each, ~8.6 MB, within the default frame size."""

ROUNDS = 3

RSS_GROWTH_MB = 100
"""Bound on the agent's RSS growth over the rounds (the target is 50 MB; parsing one
bomb frame whole costs ~1 GB)."""

STALL_MS = 250
"""Bound on the agent's longest loop stall (the target is 100 ms; parsing one bomb
frame whole holds the loop 1.3 s or more)."""


class Agent:
    """The agent process, and what the test reads from it."""

    def __init__(self, process: asyncio.subprocess.Process, ready: list[str]) -> None:
        self.process = process
        self.grpc_url, self.ws_url, self.did = ready

    def rss_mb(self) -> float:
        """The process's resident set, in MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS line")

    async def hold(self, seconds: float) -> None:
        """Keep its loop busy for ``seconds``, as a handler that never awaits would."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(f"hold {seconds}\n".encode())
        async with asyncio.timeout(TIMEOUT + seconds):
            line = await self.process.stdout.readline()
        assert line.strip() == b"held"

    async def stall_ms(self) -> float:
        """The longest stall of its loop since the previous call."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(b"gap\n")
        async with asyncio.timeout(TIMEOUT):
            line = await self.process.stdout.readline()
        word, value = line.decode().split()
        assert word == "gap"
        return float(value)


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    """A probed agent process serving gRPC and WebSocket on 127.0.0.1:0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.hostile.probed_agent",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        async with asyncio.timeout(TIMEOUT):
            line = (await process.stdout.readline()).decode().split()
        assert line[:1] == ["ready"], line
        yield Agent(process, line[1:])
    finally:
        process.stdin.close()
        try:
            async with asyncio.timeout(TIMEOUT):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def _field(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def _frame(*envelopes: bytes) -> bytes:
    # Frame{sequence: 1, envelopes: EnvelopeBatch{envelopes}}
    batch = b"".join(_field(1, envelope) for envelope in envelopes)
    return b"\x08\x01" + _field(2, batch)


def envelope_bomb() -> bytes:
    """A Frame whose EnvelopeBatch holds 4.3 million empty envelopes."""
    return _frame(*[b""] * ENVELOPES)


def metadata_bomb() -> bytes:
    """A Frame of one envelope with a million metadata entries, each with its own key."""
    keys = base64.b64encode(b"".join(i.to_bytes(3, "big") for i in range(1_000_000)))
    return _frame(b"".join(b"\x52\x06\x0a\x04" + keys[i : i + 4] for i in range(0, len(keys), 4)))


def proof_bomb() -> bytes:
    """A Frame of one envelope whose batch proof has 4 million (empty) hashes."""
    return _frame(_field(15, _field(4, b"\x1a\x00" * 4_000_000)))


async def assert_echoes(agent: Agent, url: str) -> None:
    """A well-behaved client still gets a verified answer from the agent."""
    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(url, expect_did=agent.did, learn_endpoints=False) as peer,
    ):
        reply = await peer.request("echo", b"still serving", timeout=TIMEOUT)
        assert reply.data == b"still serving"


async def _grpc_bomb(agent: Agent, frame: bytes, compression: grpc.Compression | None) -> str:
    # What the call ended with: the agent refuses, whatever the client sees first.
    authority = agent.grpc_url.removeprefix("grpc://")
    async with grpc.aio.insecure_channel(
        authority, options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        call = channel.stream_stream(SERVICE + "Connect")(compression=compression)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.write(frame)
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass
        code = await call.code()
        return f"{code.name} {await call.details()}"


async def _ws_bomb(agent: Agent, message: bytes | str) -> str:
    subprotocol = PROTO if isinstance(message, bytes) else JSON
    async with ws_connect(agent.ws_url, subprotocols=[subprotocol], max_size=None) as ws:
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(message)
            while True:
                await ws.recv()
    return f"{ws.close_code} {ws.close_reason}"


SENDERS = {
    "grpc": lambda agent, frame: _grpc_bomb(agent, frame, None),
    "grpc-gzip": lambda agent, frame: _grpc_bomb(agent, frame, grpc.Compression.Gzip),
    "ws": _ws_bomb,
}
# Refused from its headers, before anything is inflated; the client's own write
# may fail first on the call the agent ended (INTERNAL, from grpc core).
GZIP_REFUSED = ("UNIMPLEMENTED Compression algorithm 'gzip' is disabled", "INTERNAL")
BOMBS = {
    ("envelopes", "grpc"): "RESOURCE_EXHAUSTED a frame of more than 128 messages",
    ("envelopes", "grpc-gzip"): GZIP_REFUSED,
    ("envelopes", "ws"): "1013 OVERLOADED: a frame of more than 128 messages",
    ("metadata", "grpc"): "INVALID_ARGUMENT metadata has more than 256 entries",
    ("metadata", "ws"): "1007 MALFORMED: metadata has more than 256 entries",
    ("proof", "grpc"): "INVALID_ARGUMENT a batch proof has at most 16 hashes",
    ("proof", "grpc-gzip"): GZIP_REFUSED,
    ("proof", "ws"): "1007 MALFORMED: a batch proof has at most 16 hashes",
}
BUILDERS = {"envelopes": envelope_bomb, "metadata": metadata_bomb, "proof": proof_bomb}


@pytest.mark.parametrize(("bomb", "transport"), BOMBS, ids=["-".join(key) for key in BOMBS])
async def test_frame_bomb_is_refused_without_growing_rss_or_stalling(
    agent: Agent, bomb: str, transport: str
) -> None:
    """Frames of millions of tiny entries, gzip or not, are refused before they are parsed."""
    frame = BUILDERS[bomb]()
    await assert_echoes(agent, agent.grpc_url)  # every lazy start-up cost paid before
    await agent.stall_ms()
    before = agent.rss_mb()
    outcomes = [await SENDERS[transport](agent, frame) for _ in range(ROUNDS)]
    stall = await agent.stall_ms()
    growth = agent.rss_mb() - before
    assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.0f} MB"
    assert stall < STALL_MS, f"the loop stalled {stall:.0f} ms"
    for outcome in outcomes:
        assert outcome.startswith(BOMBS[bomb, transport]), outcome
    await assert_echoes(agent, agent.grpc_url)
    await assert_echoes(agent, agent.ws_url)


async def test_envelope_bomb_on_send_is_refused_without_growing_rss_or_stalling(
    agent: Agent,
) -> None:
    """A unary Send of one envelope with millions of proof hashes is refused before parsing."""
    envelope = _field(15, _field(4, b"\x1a\x00" * 2_000_000))  # 4 MB, within the size limit
    await assert_echoes(agent, agent.grpc_url)
    await agent.stall_ms()
    before = agent.rss_mb()
    async with grpc.aio.insecure_channel(agent.grpc_url.removeprefix("grpc://")) as channel:
        send = channel.unary_unary(SERVICE + "Send")
        outcomes = []
        for _ in range(ROUNDS):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await send(envelope, timeout=TIMEOUT)
            outcomes.append(f"{caught.value.code().name} {caught.value.details()}")
    stall = await agent.stall_ms()
    growth = agent.rss_mb() - before
    assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.0f} MB"
    assert stall < STALL_MS, f"the loop stalled {stall:.0f} ms"
    for outcome in outcomes:
        assert outcome.startswith("INVALID_ARGUMENT a batch proof has at most 16 hashes"), outcome


async def test_a_refused_frame_is_not_kept_by_the_session_error(
    server: sigwire.Server, open_channel: OpenChannel
) -> None:
    """The error a refused frame ends its session with holds no traceback, so not the frame."""
    sessions: list[Session] = []
    new_session = server.new_session

    def recording(stream: FrameStream, name: str) -> Session:
        session = new_session(stream, name)
        sessions.append(session)
        return session

    server.new_session = recording  # type: ignore[method-assign]
    call = raw_connect(open_channel(server))
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await write_then_read_until_error(call, _frame(*[b""] * 129))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        [session] = sessions
        await session.closed.wait()
    error = session.error
    assert isinstance(error, sigwire.OverloadedError)
    assert error.__traceback__ is None
    assert error.__context__ is None


def json_envelope_bomb(size: int) -> str:
    """A JSON Frame of ``size`` characters: an EnvelopeBatch of empty envelopes (``{}``)."""
    return '{"envelopes":{"envelopes":[' + ",".join(["{}"] * ((size - 32) // 3)) + "]}}"


def json_full_frame() -> str:
    """A JSON Frame of 128 (unsigned) envelopes, each at the metadata limit: ~6 MB."""
    envelope = {
        "kind": "echo",
        "sender": "did:key:z6MkpTHR8VNsBxYAAWHut2Geadd9jSwuBV8xRoAnwWsdvktH",
        "payload": "QUFB" * 4000,
        "nonce": "AAAAAAAAAAAAAAAAAAAAAA==",
        "createdAtMs": str(int(time.time() * 1000)),
        "metadata": {f"k{j}": "v" * 100 for j in range(256)},
    }
    envelopes = [dict(envelope, id=f"e{i}") for i in range(128)]
    return json.dumps({"sequence": "1", "envelopes": {"envelopes": envelopes}})


@pytest.mark.parametrize("size", [1_000_000, 8_400_000], ids=["1MB", "8MB"])
async def test_json_frame_bomb_neither_stalls_the_agent_nor_closes_other_streams(
    agent: Agent, size: int
) -> None:
    """A JSON frame of empty envelopes is refused from a count of its separators, before parsing."""
    text = json_envelope_bomb(size)
    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(agent.grpc_url, expect_did=agent.did, learn_endpoints=False) as peer,
    ):
        assert (await peer.request("echo", b"before")).data == b"before"
        await agent.stall_ms()
        outcomes = [await _ws_bomb(agent, text) for _ in range(ROUNDS)]
        stall = await agent.stall_ms()
        assert (await peer.request("echo", b"after")).data == b"after"
        assert peer.reconnects == 0
    assert stall < STALL_MS, f"the loop stalled {stall:.0f} ms"
    for outcome in outcomes:
        assert outcome.startswith("1007 MALFORMED: a JSON frame of more than"), outcome


async def test_a_large_json_frame_is_converted_off_the_loop(agent: Agent) -> None:
    """A JSON frame within every limit but slow to convert is answered without stalling the loop."""
    text = json_full_frame()
    await assert_echoes(agent, agent.grpc_url)
    await agent.stall_ms()
    refused = set()
    async with (
        asyncio.timeout(TIMEOUT),
        ws_connect(agent.ws_url, subprotocols=[JSON], max_size=None) as ws,
    ):
        await ws.send(text)
        while len(refused) < 128:
            message = json.loads(await ws.recv())
            for reply in message.get("replies", {}).get("replies", []):
                assert reply["error"]["reason"] == "SIGNATURE_MISSING"
                refused.add(reply["requestId"])
    stall = await agent.stall_ms()
    assert stall < JSON_STALL_MS, f"the loop stalled {stall:.0f} ms"


async def test_a_late_loop_declares_no_peer_dead(agent: Agent) -> None:
    """A loop held past the heartbeat timeout does not close the streams it could not read."""
    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(agent.grpc_url, expect_did=agent.did, learn_endpoints=False) as peer,
    ):
        assert (await peer.request("echo", b"before")).data == b"before"
        await agent.hold(2.5)  # the agent's heartbeat timeout is 1 s
        assert (await peer.request("echo", b"after")).data == b"after"
        assert peer.reconnects == 0


def _frames_holding(size: int) -> list[str]:
    # Python frames (kept alive by a traceback) with a bytes local of ``size`` bytes.
    gc.collect()
    return [
        f"{obj.f_code.co_name}:{name}"
        for obj in gc.get_objects()
        if isinstance(obj, types.FrameType)
        for name, value in obj.f_locals.items()
        if isinstance(value, bytes) and len(value) == size
    ]


@pytest.mark.parametrize("method", ["Send", "SendStream"])
async def test_a_refused_request_is_not_kept_after_its_call(
    server: sigwire.Server, open_channel: OpenChannel, method: str
) -> None:
    """No frame of a refused unary call, kept by grpc after the call, holds the request."""
    envelope = _field(15, _field(4, b"\x1a\x00" * 40_000)) + b"\x08\x01" * 7
    refused = send_refused if method == "Send" else send_stream_refused
    for _ in range(ROUNDS):
        failure = await refused(open_channel(server), envelope)
        assert (failure.code, failure.info.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "MALFORMED",
        )
    assert _frames_holding(len(envelope)) == []
