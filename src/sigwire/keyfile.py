"""Private key and trust files on disk.

Private keys are unencrypted PKCS#8 PEM files written with mode 0600 and
refused, like ssh does, when group or others may read them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
from pathlib import Path

from sigwire.errors import InsecureKeyFileError, KeyFileError
from sigwire.signing import AllowList, Identity

__all__ = [
    "default_key_path",
    "load_allow_list",
    "load_or_create_identity",
    "read_private_key",
    "write_private_key",
]

log = logging.getLogger("sigwire.keyfile")

_MAX_KEY_FILE = 64 * 1024
_CHECK_MODE = sys.platform != "win32"


def default_key_path() -> Path:
    """The per-user key: ``$SIGWIRE_KEY``, else ``$XDG_CONFIG_HOME/sigwire/identity.pem``."""
    if explicit := os.environ.get("SIGWIRE_KEY"):
        return Path(explicit)
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(config) / "sigwire" / "identity.pem"


def read_private_key(path: str | os.PathLike[str]) -> bytes:
    """Read a private key file after checking that only its owner can read it.

    Raises:
        KeyFileError: Missing, not a regular file, too large, or unreadable.
        InsecureKeyFileError: Group or others have any permission on it.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise KeyFileError(name, "no such file (create one with `sigwire keygen`)") from None
    except OSError as exc:
        raise KeyFileError(name, exc.strerror or str(exc)) from None
    try:
        # fstat on the open descriptor: the file checked is the file read. And
        # before fdopen, which refuses a directory with a bare IsADirectoryError.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(name, "not a regular file")
        if _CHECK_MODE and info.st_mode & 0o077:
            raise InsecureKeyFileError(name, stat.S_IMODE(info.st_mode))
        if info.st_size > _MAX_KEY_FILE:
            raise KeyFileError(name, "too large to be a key file")
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        return handle.read(_MAX_KEY_FILE)


def write_private_key(path: str | os.PathLike[str], pem: bytes, *, overwrite: bool = False) -> Path:
    """Write ``pem`` to ``path`` with mode 0600, creating parent directories (0700).

    The file is written under a temporary name and renamed into place, so a
    reader never sees a partial key and the mode is right from the first byte.

    Raises:
        KeyFileError: The file exists and ``overwrite`` is False, or cannot be written.
    """
    target = Path(path)
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if target.exists() and not overwrite:
            raise KeyFileError(str(target), "already exists; refusing to overwrite a key")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o600)  # umask cannot widen it, but be explicit
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            if overwrite:
                os.replace(tmp, target)
            else:
                os.link(tmp, target)  # fails if another writer won the race
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except FileExistsError:
        raise KeyFileError(str(target), "already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(str(target), exc.strerror or str(exc)) from None
    return target


def load_or_create_identity(path: str | os.PathLike[str] | None = None) -> Identity:
    """Load the key at ``path`` (default :func:`default_key_path`), creating it if absent.

    A key it creates is announced as a WARNING on the ``sigwire.keyfile``
    logger (stderr, from the command line): a new identity is a new DID, one
    that no peer knows yet.
    """
    target = Path(path) if path is not None else default_key_path()
    if not target.exists():
        identity = Identity.generate()
        try:
            identity.save(target)
        except KeyFileError:
            if not target.exists():
                raise
            # Another process created it first; use theirs.
        else:
            named = (
                " (named by $SIGWIRE_KEY)" if path is None and os.environ.get("SIGWIRE_KEY") else ""
            )
            log.warning(
                "created a new identity %s in %s%s: peers that know another DID of "
                "yours will not recognise it",
                identity.did,
                target,
                named,
            )
            return identity
    return Identity.load(target)


def load_allow_list(path: str | os.PathLike[str]) -> AllowList:
    """Load a trust file: one ``did:key`` per line, ``#`` comments allowed.

    Raises:
        KeyFileError: The file cannot be read.
        InvalidDidError: A line is not a valid did:key.
    """
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(name, f"cannot read trust file: {exc}") from None
    return AllowList.from_text(text, source=name)
