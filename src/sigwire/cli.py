"""The ``sigwire`` command line.

Commands that need an identity take ``--key FILE`` and default to the per-user
key (:func:`sigwire.keyfile.default_key_path`), created on first use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sigwire.errors import SigwireError
from sigwire.keyfile import default_key_path
from sigwire.signing import Identity

__all__ = ["build_parser", "main"]


def _keygen(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    path = identity.save(args.out, overwrite=args.force)
    print(identity.did)
    print(f"wrote {path} (mode 0600)", file=sys.stderr)
    return 0


def _did(args: argparse.Namespace) -> int:
    print(Identity.load(args.file).did)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sigwire`` command (argparse: stdlib is enough)."""
    parser = argparse.ArgumentParser(
        prog="sigwire",
        description="Signed agent-to-agent messaging over gRPC, with a WebSocket fallback.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = commands.add_parser("keygen", help="create an Ed25519 identity and print its DID")
    keygen.add_argument("--out", type=Path, required=True, help="key file to write (mode 0600)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    keygen.set_defaults(run=_keygen)

    did = commands.add_parser("did", help="print the did:key of a key file")
    did.add_argument("file", type=Path, nargs="?", default=None, help="key file")
    did.set_defaults(run=_did)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "file", "unset") is None:
        args.file = default_key_path()
    try:
        status: int = args.run(args)
    except SigwireError as exc:
        print(f"sigwire: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
