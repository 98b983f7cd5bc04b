"""scripts/setup, scripts/demo and scripts/test in a copy of the tree, with pip and npm stood in.

The stand-ins record how they were called, so the real scripts run as they
would on a first checkout without downloading anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]

RECORDER = """#!/bin/sh
echo "{name} $*" >> "{calls}"
{extra}
"""


def _recorder(path: Path, calls: Path, extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECORDER.format(name=path.name, calls=calls, extra=extra))
    path.chmod(0o755)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A first checkout: the scripts and manifests, a .venv whose python and sigwire record."""
    root, calls, tools = tmp_path / "repo", tmp_path / "calls", tmp_path / "tools"
    for name in ("scripts/setup", "scripts/demo", "scripts/test", "pyproject.toml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    lock = "tests/interop/node/package-lock.json"
    (root / lock).parent.mkdir(parents=True)
    shutil.copy2(ROOT / lock, root / lock)
    _recorder(root / ".venv/bin/python", calls)
    _recorder(root / ".venv/bin/sigwire", calls)
    _recorder(tools / "node", calls)
    _recorder(tools / "npm", calls, extra="mkdir -p tests/interop/node/node_modules")
    env = {
        **os.environ,
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
    }
    return root, calls, env


def _run(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False
    )


def test_demo_announces_each_setup_step_and_installs_no_node_packages(
    tree: tuple[Path, Path, dict[str, str]],
) -> None:
    """The first scripts/demo says what it installs, line by line, and never runs npm."""
    root, calls, env = tree
    result = _run(root / "scripts/demo", env=env)
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stderr.splitlines() if line.startswith("setup: ")]
    assert any("installing sigwire" in step for step in steps), result.stderr
    recorded = calls.read_text().splitlines()
    assert any(line.startswith("python -m pip install") for line in recorded)
    assert not any(line.startswith("npm") for line in recorded), recorded
    assert recorded[-1] == "sigwire demo"


def test_tests_install_the_node_interop_packages(tree: tuple[Path, Path, dict[str, str]]) -> None:
    """scripts/test (as CI runs it) runs npm ci for the interop clients before pytest."""
    root, calls, env = tree
    result = _run(root / "scripts/test", "-q", env=env)
    assert result.returncode == 0, result.stderr
    recorded = calls.read_text().splitlines()
    npm = [n for n, line in enumerate(recorded) if line.startswith("npm ci")]
    pytest_run = recorded.index("python -m pytest -q")
    assert npm, recorded
    assert npm[0] < pytest_run
    assert "npm ci" in result.stderr


def test_setup_refuses_an_unknown_option(tree: tuple[Path, Path, dict[str, str]]) -> None:
    """scripts/setup with an option it does not know prints its usage and exits 2."""
    root, _, env = tree
    result = _run(root / "scripts/setup", "--nod", env=env)
    assert result.returncode == 2
    assert "usage: scripts/setup [--node]" in result.stderr
