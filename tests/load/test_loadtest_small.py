"""scripts/loadtest at a small size, with its faults: nothing lost, nothing doubled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_load_with_a_cut_and_a_restart_loses_and_doubles_nothing() -> None:
    """8 agents x 30 messages through a connection cut and an agent restart all arrive once."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "loadtest"), "--agents", "8", "--messages", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line and " " in line)
    assert lines["sent"] == "240"
    assert lines["accepted"] == "240"
    assert lines["handled"] == "240"
    assert lines["duplicated"] == "0"
    assert lines["lost"] == "0"
    faults = [line for line in result.stdout.splitlines() if line.startswith("fault:")]
    assert any("cut" in fault for fault in faults), result.stdout
    assert any("restarted" in fault for fault in faults), result.stdout
