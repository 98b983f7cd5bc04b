"""The sigwire command line: keygen and did."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sigwire.cli import main
from sigwire.signing import Identity, public_key_from_did


def _keygen(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    status = main(["keygen", "--out", str(path), *extra])
    out, err = capsys.readouterr()
    return status, out, err


def test_keygen_prints_did_and_writes_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen prints the new DID on stdout and writes the key with mode 0600."""
    path = tmp_path / "agent.pem"
    status, out, err = _keygen(path, capsys)
    assert status == 0
    did = out.strip()
    assert out == did + "\n"
    public_key_from_did(did)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).did == did
    assert str(path) in err


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """keygen on an existing file exits 1, says so, and keeps the old key."""
    path = tmp_path / "agent.pem"
    _, first, _ = _keygen(path, capsys)
    status, out, err = _keygen(path, capsys)
    assert status == 1
    assert out == ""
    assert "already exists" in err
    assert "Traceback" not in err
    assert Identity.load(path).did == first.strip()


def test_keygen_force_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """keygen --force replaces an existing key with a new one."""
    path = tmp_path / "agent.pem"
    _, first, _ = _keygen(path, capsys)
    status, second, _ = _keygen(path, capsys, "--force")
    assert status == 0
    assert second != first
    assert Identity.load(path).did == second.strip()


def test_did_prints_the_same_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """did FILE prints the DID that keygen printed for that file."""
    path = tmp_path / "agent.pem"
    _, generated, _ = _keygen(path, capsys)
    assert main(["did", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == generated
    assert err == ""


def test_did_uses_sigwire_key_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """did without a file reads the key named by $SIGWIRE_KEY."""
    path = tmp_path / "agent.pem"
    _, generated, _ = _keygen(path, capsys)
    monkeypatch.setenv("SIGWIRE_KEY", str(path))
    assert main(["did"]) == 0
    assert capsys.readouterr().out == generated


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_did_on_insecure_file_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    """did on a key others can read exits 1 with a one-line permissions message, no traceback."""
    path = tmp_path / "agent.pem"
    _keygen(path, capsys)
    path.chmod(mode)
    assert main(["did", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("sigwire: error: ")
    assert "permissions" in err
    assert f"{mode:04o}" in err
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_did_on_missing_file_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """did on a missing file exits 1 and suggests keygen."""
    assert main(["did", str(tmp_path / "missing.pem")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "keygen" in err
    assert "Traceback" not in err


def test_did_on_directory_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """did on a directory exits 1 with an error message, not a traceback."""
    assert main(["did", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sigwire: error: ")
    assert "Traceback" not in err


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """sigwire without a command exits 2 with usage on stderr."""
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_serve_with_a_missing_key_file_fails_instead_of_creating_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--key naming a file that does not exist is an error, not a new identity."""
    missing = tmp_path / "typo.pem"
    assert main(["send", "grpc://127.0.0.1:1", "echo", "--key", str(missing)]) == 1
    assert "no such file" in capsys.readouterr().err
    assert not missing.exists()
