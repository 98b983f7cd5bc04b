"""Cross-check the signing vectors with an independent Node implementation.

tests/interop/node/check_vectors.mjs was written from docs/signing.md alone;
if it agrees with tests/vectors/signing.json, the document is sufficient to
implement sigwire signing and verification in another language.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "interop" / "node" / "check_vectors.mjs"
VECTORS = ROOT / "tests" / "vectors" / "signing.json"
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$")


def test_node_reproduces_signing_vectors() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip(
            "node is not installed; the Node cross-check of the signing vectors did not run"
        )
    result = subprocess.run(
        [node, str(SCRIPT.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = result.stdout.strip().splitlines()
    assert lines, output
    summary = SUMMARY.match(lines[-1])
    assert summary is not None, output
    passed, failed = int(summary[1]), int(summary[2])
    assert failed == 0, output
    assert passed > 0, output
    # Every vector, batch signatures included, got its own line.
    vectors = json.loads(VECTORS.read_text(encoding="utf-8"))
    checked = sum(len(vectors[kind]) for kind in ("envelopes", "replies", "cards", "batches"))
    assert sum(line.startswith("ok    ") for line in lines) == checked + 1, output  # + self-test
