"""scripts/bench --quick runs end to end and reports every row (speed is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench"

ROWS = (
    "raw_grpc_unary_p50",
    "raw_grpc_unary_p99",
    "raw_grpc_unary_64",
    "raw_grpc_stream",
    "raw_grpc_stream_p50",
    "raw_grpc_stream_p99",
    "raw_ws_stream",
    "raw_ws_p50",
    "raw_ws_p99",
    "sigwire_grpc_unary_p50",
    "sigwire_grpc_unary_p99",
    "sigwire_grpc_send_p50",
    "sigwire_grpc_send_p99",
    "sigwire_grpc_unary_64",
    "sigwire_grpc_send_64",
    "sigwire_grpc_connect_stream",
    "sigwire_ws_connect_stream",
    "sigwire_idle_rss_before",
    "sigwire_idle_rss_after",
    "sigwire_idle_stream_rss",
)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_quick_bench_reports_every_row() -> None:
    """`scripts/bench --quick --json` exits 0 with a positive value for every row."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout)
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == set(ROWS), done.stderr[-4000:]
    for name in ROWS:
        row = by_name[name]
        assert set(row) >= {"name", "metric", "value", "unit", "baseline", "ratio"}
        assert row["value"] > 0, row
        if row["baseline"] is not None:
            assert row["ratio"] is not None, row
            assert row["ratio"] > 0, row
