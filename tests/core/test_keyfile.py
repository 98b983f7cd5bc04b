"""Private key and trust files: modes, parsing, overwriting, default locations."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sigwire.errors import InsecureKeyFileError, InvalidDidError, KeyFileError
from sigwire.keyfile import (
    default_key_path,
    load_allow_list,
    load_or_create_identity,
    read_private_key,
    write_private_key,
)
from sigwire.signing import Identity

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_key_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_save_writes_mode_0600(tmp_path: Path) -> None:
    """Identity.save writes the key with mode 0600 whatever the umask."""
    old_umask = os.umask(0)
    try:
        path = Identity.generate().save(tmp_path / "agent.pem")
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_save_creates_private_parent_directories(tmp_path: Path) -> None:
    """Identity.save creates missing parent directories with mode 0700."""
    path = Identity.generate().save(tmp_path / "a" / "b" / "agent.pem")
    assert path.exists()
    assert _mode(tmp_path / "a" / "b") == 0o700


def test_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    """Identity.save leaves only the key file behind."""
    Identity.generate().save(tmp_path / "agent.pem")
    assert [p.name for p in tmp_path.iterdir()] == ["agent.pem"]


def test_load_round_trip(tmp_path: Path) -> None:
    """A saved identity loads back with the same DID and key."""
    identity = Identity.generate()
    path = identity.save(tmp_path / "agent.pem")
    loaded = Identity.load(path)
    assert loaded.did == identity.did
    assert loaded.to_seed_hex() == identity.to_seed_hex()
    assert Identity.load(str(path)).did == identity.did


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610, 0o601, 0o606, 0o777])
def test_key_readable_by_others_is_insecure(tmp_path: Path, mode: int) -> None:
    """A key file with any group or other permission raises InsecureKeyFileError naming the mode."""
    path = Identity.generate().save(tmp_path / "agent.pem")
    path.chmod(mode)
    with pytest.raises(InsecureKeyFileError) as info:
        Identity.load(path)
    assert info.value.mode == mode
    assert f"{mode:04o}" in str(info.value)
    assert "chmod 600" in str(info.value)
    assert info.value.path == str(path)
    assert isinstance(info.value, KeyFileError)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_key_is_accepted(tmp_path: Path, mode: int) -> None:
    """A key file that only its owner may access (0600, 0400, 0700) loads."""
    identity = Identity.generate()
    path = identity.save(tmp_path / "agent.pem")
    path.chmod(mode)
    assert Identity.load(path).did == identity.did


def test_missing_key_file(tmp_path: Path) -> None:
    """Loading a missing key file raises KeyFileError suggesting sigwire keygen."""
    with pytest.raises(KeyFileError, match="keygen") as info:
        Identity.load(tmp_path / "nope.pem")
    assert type(info.value) is KeyFileError


def test_directory_is_not_a_key_file(tmp_path: Path) -> None:
    """Loading a directory raises KeyFileError."""
    directory = tmp_path / "dir.pem"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        Identity.load(directory)


def test_symlink_is_refused(tmp_path: Path) -> None:
    """A key path that is a symbolic link is refused with KeyFileError."""
    real = Identity.generate().save(tmp_path / "real.pem")
    link = tmp_path / "link.pem"
    link.symlink_to(real)
    with pytest.raises(KeyFileError):
        Identity.load(link)


def test_oversized_key_file_is_refused(tmp_path: Path) -> None:
    """A key file far larger than any key raises KeyFileError."""
    path = _write_key_file(tmp_path / "big.pem", b"A" * (1024 * 1024))
    with pytest.raises(KeyFileError, match="too large"):
        read_private_key(path)


GARBAGE = {
    "empty": b"",
    "text": b"hello world\n",
    "binary": bytes(range(256)),
    "truncated pem": b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n",
    "bad base64": b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
    "public key": ed25519.Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    "openssh ed25519 key": ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ),
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_key_file(tmp_path: Path, data: bytes) -> None:
    """A key file that is not an Ed25519 private key in PEM raises KeyFileError."""
    path = _write_key_file(tmp_path / "garbage.pem", data)
    with pytest.raises(KeyFileError):
        Identity.load(path)


def test_encrypted_key_file(tmp_path: Path) -> None:
    """A password-protected key raises KeyFileError."""
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = _write_key_file(tmp_path / "enc.pem", pem)
    with pytest.raises(KeyFileError):
        Identity.load(path)


def test_rsa_key_file(tmp_path: Path) -> None:
    """An RSA private key raises KeyFileError naming the key type."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = _write_key_file(tmp_path / "rsa.pem", _pkcs8(key))
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        Identity.load(path)


def test_p256_key_file(tmp_path: Path) -> None:
    """An EC P-256 private key raises KeyFileError naming the key type."""
    path = _write_key_file(tmp_path / "p256.pem", _pkcs8(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        Identity.load(path)


def test_ed448_key_file(tmp_path: Path) -> None:
    """An Ed448 private key (the other EdDSA curve) raises KeyFileError."""
    path = _write_key_file(tmp_path / "ed448.pem", _pkcs8(ed448.Ed448PrivateKey.generate()))
    with pytest.raises(KeyFileError):
        Identity.load(path)


def test_overwrite_is_refused_by_default(tmp_path: Path) -> None:
    """Saving over an existing key raises KeyFileError and keeps the old key."""
    first = Identity.generate()
    path = first.save(tmp_path / "agent.pem")
    with pytest.raises(KeyFileError, match="already exists"):
        Identity.generate().save(path)
    assert Identity.load(path).did == first.did
    assert [p.name for p in tmp_path.iterdir()] == ["agent.pem"]


def test_overwrite_when_asked(tmp_path: Path) -> None:
    """Saving with overwrite=True replaces the key, still with mode 0600."""
    path = Identity.generate().save(tmp_path / "agent.pem")
    path.chmod(0o400)
    second = Identity.generate()
    assert second.save(path, overwrite=True) == path
    assert Identity.load(path).did == second.did
    assert _mode(path) == 0o600


def test_write_into_a_file_as_directory_fails(tmp_path: Path) -> None:
    """Writing under a path whose parent is a regular file raises KeyFileError."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KeyFileError):
        write_private_key(blocker / "agent.pem", Identity.generate().to_pem())


def test_load_or_create_creates_once_then_reuses(tmp_path: Path) -> None:
    """load_or_create_identity creates a 0600 key on first use and reuses it afterwards."""
    path = tmp_path / "sub" / "identity.pem"
    created = load_or_create_identity(path)
    assert _mode(path) == 0o600
    content = path.read_bytes()
    again = load_or_create_identity(path)
    assert again.did == created.did
    assert path.read_bytes() == content


def test_load_or_create_refuses_an_insecure_existing_key(tmp_path: Path) -> None:
    """load_or_create_identity refuses, and keeps, an existing key that others can read."""
    path = Identity.generate().save(tmp_path / "identity.pem")
    path.chmod(0o644)
    content = path.read_bytes()
    with pytest.raises(InsecureKeyFileError):
        load_or_create_identity(path)
    assert path.read_bytes() == content


def test_load_or_create_uses_the_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_or_create_identity() with no path creates the key at default_key_path()."""
    monkeypatch.delenv("SIGWIRE_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    identity = load_or_create_identity()
    expected = tmp_path / "config" / "sigwire" / "identity.pem"
    assert Identity.load(expected).did == identity.did


def test_default_key_path_honours_sigwire_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$SIGWIRE_KEY takes precedence over $XDG_CONFIG_HOME."""
    monkeypatch.setenv("SIGWIRE_KEY", str(tmp_path / "explicit.pem"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert default_key_path() == tmp_path / "explicit.pem"


def test_default_key_path_honours_xdg_config_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without $SIGWIRE_KEY the key lives in $XDG_CONFIG_HOME/sigwire/identity.pem."""
    monkeypatch.delenv("SIGWIRE_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert default_key_path() == tmp_path / "config" / "sigwire" / "identity.pem"


def test_default_key_path_falls_back_to_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With neither variable set (or both empty) the key lives in ~/.config/sigwire."""
    monkeypatch.setenv("SIGWIRE_KEY", "")
    monkeypatch.setenv("XDG_CONFIG_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_key_path() == tmp_path / ".config" / "sigwire" / "identity.pem"


def test_load_allow_list(tmp_path: Path) -> None:
    """load_allow_list reads one DID per line with comments and blank lines."""
    alice, bob = Identity.generate(), Identity.generate()
    path = tmp_path / "trusted.txt"
    path.write_text(f"# trusted\n{alice.did}\n\n{bob.did}  # bob\n", encoding="utf-8")
    assert load_allow_list(path).dids == {alice.did, bob.did}


def test_load_allow_list_names_file_and_line(tmp_path: Path) -> None:
    """A bad line in a trust file raises InvalidDidError naming the file and line."""
    path = tmp_path / "trusted.txt"
    path.write_text(f"{Identity.generate().did}\ndid:web:example.com\n", encoding="utf-8")
    with pytest.raises(InvalidDidError, match=f"{path}:2:"):
        load_allow_list(path)


def test_load_allow_list_missing_or_binary(tmp_path: Path) -> None:
    """A missing or non-UTF-8 trust file raises KeyFileError."""
    with pytest.raises(KeyFileError):
        load_allow_list(tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(KeyFileError):
        load_allow_list(binary)
