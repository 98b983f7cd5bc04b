"""Node.js clients, written from the docs alone, against a real sigwire agent.

tests/interop/node/grpc_client.mjs loads the .proto files at run time and
calls every RPC, health and the Connect stream; ws_client.mjs speaks the
``sigwire.v1.json`` WebSocket subprotocol without any protobuf library. Both
sign their own envelopes, verify every reply and answer a push from the
agent (tests/interop/agent.py), which checks their signed answers.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "interop" / "node"
AGENT = ROOT / "tests" / "interop" / "agent.py"
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$")
# What each program checks today; fewer passing checks means some silently went missing.
GRPC_CHECKS = 34
WS_CHECKS = 16


@dataclass
class Agent:
    """The running agent.py: its endpoints, DID, and the lines it printed."""

    grpc: str
    ws: str
    did: str
    lines: queue.Queue[str] = field(repr=False)
    errors: queue.Queue[str] = field(repr=False)
    seen: list[str] = field(default_factory=list)

    def wait_for(self, wanted: str) -> bool:
        """Whether agent.py prints the line ``wanted`` within TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        while wanted not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self.seen.append(self.lines.get(timeout=left))
            except queue.Empty:
                return False
        return True

    def report(self) -> str:
        """What agent.py printed so far, for assertion messages."""
        errors = []
        while not self.errors.empty():
            errors.append(self.errors.get_nowait())
        return "\n".join(["agent.py stdout:", *self.seen, "agent.py stderr:", *errors])


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the Node interop tests did not run")
    if not (NODE_DIR / "node_modules").is_dir():
        pytest.fail(
            "tests/interop/node/node_modules is missing: run scripts/setup --node "
            "(scripts/test does; it runs npm ci there when node and npm are installed)"
        )
    return node


def _pump(stream: Iterator[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    _node()
    proc = subprocess.Popen(
        [sys.executable, str(AGENT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    errors: queue.Queue[str] = queue.Queue()
    # Both pipes are drained all along, so a chatty agent never blocks on a full pipe.
    readers = [
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, errors), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        try:
            first = lines.get(timeout=TIMEOUT)
        except queue.Empty:
            first = ""
        if not first.startswith("{"):
            proc.kill()
            proc.wait(TIMEOUT)
            for reader in readers:
                reader.join(TIMEOUT)
            stderr = "\n".join(errors.get_nowait() for _ in range(errors.qsize()))
            pytest.fail(f"agent.py did not print its endpoints: {first!r}\n{stderr}")
        endpoints = json.loads(first)
        yield Agent(endpoints["grpc"], endpoints["ws"], endpoints["did"], lines, errors)
    finally:
        proc.stdin.close()  # agent.py stops when its standard input closes
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)
        for reader in readers:
            reader.join(TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()


def _run_node(script: str, url: str, agent: Agent) -> tuple[str, int]:
    """Run a Node client; return its DID and how many checks passed (all of them)."""
    result = subprocess.run(
        [_node(), script, url, agent.did],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = f"{result.stdout}{result.stderr}"
    assert result.returncode == 0, f"{output}\n{agent.report()}"
    lines = result.stdout.strip().splitlines()
    assert lines, output
    assert lines[0].startswith("did did:key:z6Mk"), output
    summary = SUMMARY.match(lines[-1])
    assert summary is not None, output
    assert int(summary[2]) == 0, output
    return lines[0].removeprefix("did "), int(summary[1])


def test_node_grpc_client(agent: Agent) -> None:
    """A Node gRPC client signs, verifies, streams, is refused with ErrorInfo and answers a push."""
    did, passed = _run_node("grpc_client.mjs", agent.grpc, agent)
    assert passed >= GRPC_CHECKS
    assert agent.wait_for(f"push ok {did}"), agent.report()


def test_node_websocket_json_client(agent: Agent) -> None:
    """A Node client on the sigwire.v1.json WebSocket subprotocol works without protobuf."""
    did, passed = _run_node("ws_client.mjs", agent.ws, agent)
    assert passed >= WS_CHECKS
    assert agent.wait_for(f"push ok {did}"), agent.report()
