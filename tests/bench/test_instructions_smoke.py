"""scripts/instructions: the workloads it counts run (valgrind itself, ~30 s, is not run here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "instructions"


@pytest.mark.parametrize(
    "mode", ["requests", "crypto", "stream-memory", "stream-grpc", "stream-ws"]
)
def test_the_counted_workloads_run(mode: str) -> None:
    """Every workload (requests, Ed25519 alone, pipelined over each transport) finishes cleanly."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--run", mode, "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
