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
            # One round: the ratio is that round's row over its baseline.
            assert row["ratio_runs"] == [row["ratio"]], row
            baseline = by_name[row["baseline"]]
            # (Both are rounded to three decimals in the JSON.)
            assert row["ratio"] == pytest.approx(row["value"] / baseline["value"], abs=1e-3)


def test_ratios_are_taken_within_each_round() -> None:
    """A row's ratio is the median of per-round ratios; a round one row missed is left out."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("sigwire_bench_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = bench  # dataclasses look their module up there
    try:
        loader.exec_module(bench)
    finally:
        del sys.modules[loader.name]
    runs = bench.Runs()
    runs.values = {
        "raw_grpc_stream": [100.0, 200.0, 50.0],
        "sigwire_grpc_connect_stream": [150.0, 160.0],
    }
    runs.rounds = {"raw_grpc_stream": [1, 2, 3], "sigwire_grpc_connect_stream": [1, 3]}
    rows = {row["name"]: row for row in bench.build_rows(runs)}
    stream = rows["sigwire_grpc_connect_stream"]
    assert stream["ratio_runs"] == [1.5, 3.2]
    assert stream["ratio"] == pytest.approx(2.35)
