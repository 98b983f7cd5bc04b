"""The ``sigwire`` command line (argparse: the stdlib parser is enough here).

Commands that need an identity take ``--key FILE`` and default to the per-user
key (:func:`sigwire.keyfile.default_key_path`), created on first use.

Every failure ends in one line on stderr, ``sigwire: error: ...``, saying what
to do, and an exit status: 2 for a usage error (a bad flag, value or
combination of flags), 1 for anything found at run time, 130 on Ctrl-C, 141
when stdout is a closed pipe (``| head``).
A traceback is printed only with ``-v``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import importlib
import importlib.metadata
import json
import logging
import math
import os
import signal
import socket
import sqlite3
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from sigwire.client import connect
from sigwire.dispatch import Limits
from sigwire.errors import (
    DeadlineExceededError,
    InvalidDidError,
    NoTransportAvailableError,
    SigwireError,
    StoreError,
    UnknownSignerError,
)
from sigwire.keyfile import default_key_path, load_allow_list, load_or_create_identity
from sigwire.session import max_frame_size
from sigwire.signing import AllowList, Identity, ReplayGuard, Verifier, public_key_from_did
from sigwire.targets import ANY_ORIGIN, DEFAULT_WS_PATH, parse_origin, parse_target
from sigwire.transports.base import TlsClientConfig

if TYPE_CHECKING:
    from sigwire.server import Server
    from sigwire.store import SqliteStore

__all__ = ["build_parser", "build_server", "main"]

log = logging.getLogger("sigwire.cli")


class _CommandError(Exception):
    """A problem with the command's input: one line, exit status 1 (2 for misused flags)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _fail(message: str, *, usage: bool = False) -> NoReturn:
    raise _CommandError(message, 2 if usage else 1)


def _keygen(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    path = identity.save(args.out, overwrite=args.force)
    print(identity.did)
    print(f"wrote {path} (mode 0600)", file=sys.stderr)
    return 0


def _did(args: argparse.Namespace) -> int:
    print(Identity.load(args.file or default_key_path()).did)
    return 0


def _usage(message: str) -> NoReturn:
    print(f"sigwire: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _identity(args: argparse.Namespace) -> Identity:
    # Only the per-user default is created on first use: a mistyped --key path
    # must not silently become a brand-new identity.
    if args.key is not None:
        return Identity.load(args.key)
    # A new per-user key is announced by load_or_create_identity (a WARNING on
    # stderr): a mistyped $SIGWIRE_KEY must not run under a stranger's identity
    # without a word.
    return load_or_create_identity()


def _load_app(spec: str) -> Callable[[Any], None]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        _fail(f"--app takes MODULE:ATTR (e.g. myapp:register), not {spec!r}", usage=True)
    # As uvicorn does: the current directory first, so that `--app myapp:register`
    # finds ./myapp.py without PYTHONPATH=.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            _fail(
                f"--app {spec}: no module named {exc.name!r} in {cwd} or on the Python "
                "path; run from the directory holding it, or set PYTHONPATH"
            )
        raise
    for part in attr.split("."):
        if not hasattr(target, part):
            _fail(f"--app {spec}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        _fail(f"--app {spec}: {attr} is not callable; give a function taking the Server")
    return target  # type: ignore[no-any-return]


def _check_listen_address(flag: str, address: str) -> None:
    """Refuse an address whose host does not resolve, before anything is bound."""
    if address.startswith("unix:"):
        return
    host = address.rpartition(":")[0].strip("[]")
    if not host:
        return
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        _fail(
            f"{flag} {address}: unknown host {host!r} ({exc.strerror}); "
            "give an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
        )


def _check_tls_files(cert: str, key: str, ca: str | None) -> None:
    """Load the TLS files the way the listeners will, so a bad pair is named before binding."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path is not None and not Path(path).is_file():
            _fail(f"{flag} {path}: no such file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            _fail(
                f"--tls-key {key} is not the key of --tls-cert {cert}; "
                "give the private key the certificate was issued for"
            )
        _fail(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its "
            f"PEM private key ({exc.reason or exc})"
        )
    if ca is not None:
        try:
            context.load_verify_locations(ca)
        except ssl.SSLError as exc:
            _fail(f"--tls-ca {ca}: not a PEM CA certificate ({exc.reason or exc})")


def _open_store(path: Path) -> SqliteStore:
    from sigwire.store import SqliteStore

    if path.is_dir():
        _fail(f"--store {path} is a directory; give a file path, e.g. {path / 'agent.db'}")
    try:
        return SqliteStore(path)
    except StoreError as exc:
        _fail(f"--{exc}")
    except sqlite3.Error as exc:
        _fail(
            f"--store {path}: not a usable SQLite store ({exc}); give a new file path, "
            "or move this file aside"
        )


def _load_trust(path: Path, allow_empty: bool) -> AllowList:
    allowed = load_allow_list(path)
    if not allowed.dids:
        if not allow_empty:
            _fail(
                f"--trust {path} lists no DIDs, so every sender would be refused; "
                "add one did:key per line, or pass --allow-empty-trust to start anyway"
            )
        _warn(f"--trust {path} lists no DIDs: every sender is refused")
    return allowed


def _warn(message: str) -> None:
    print(f"sigwire: warning: {message}", file=sys.stderr, flush=True)


def build_server(args: argparse.Namespace) -> Server:
    """The Server that ``sigwire serve ARGS`` runs, handlers included (not started)."""
    from sigwire.demo import add_builtin_handlers
    from sigwire.server import Server
    from sigwire.transports.base import TlsServerConfig

    if not args.grpc and not args.ws:
        _fail("nothing to serve: give --grpc HOST:PORT, --ws HOST:PORT or both", usage=True)
    if bool(args.tls_cert) != bool(args.tls_key):
        _fail("--tls-cert and --tls-key go together", usage=True)
    if args.tls_cert:
        _check_tls_files(args.tls_cert, args.tls_key, args.tls_ca)
    tls = TlsServerConfig(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    if args.grpc:
        _check_listen_address("--grpc", args.grpc)
    if args.ws:
        _check_listen_address("--ws", args.ws)
    elif args.allow_origin:
        _fail(
            "--allow-origin admits web pages to the WebSocket listener: give --ws too", usage=True
        )
    # Everything that can refuse the command comes before the identity, which
    # may be created (and announced) on first use.
    trust = _load_trust(args.trust, args.allow_empty_trust) if args.trust else None
    store = _open_store(args.store) if args.store else None
    identity = _identity(args)
    server = Server(
        identity,
        grpc=args.grpc or None,
        ws=args.ws,
        ws_path=args.ws_path,
        name=args.name,
        trust=trust,
        limits=Limits(max_message_size=args.max_message_size),
        tls=tls,
        store=store,
        replay_guard=ReplayGuard(capacity=args.replay_capacity),
        allow_origins=args.allow_origin,
        advertise=args.advertise,
    )
    if args.app:
        _load_app(args.app)(server)
    else:
        add_builtin_handlers(server)
    return server


async def _serve(args: argparse.Namespace) -> int:
    server = build_server(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    print(f"sigwire agent {server.identity.did}", flush=True)
    for url in server.urls:
        print(f"listening on {url}", flush=True)
    await stop.wait()
    print(f"draining (grace {args.grace:g}s)", file=sys.stderr, flush=True)
    await server.stop(grace=args.grace)
    return 0


def _tls(args: argparse.Namespace) -> TlsClientConfig | None:
    if bool(args.tls_cert) != bool(args.tls_key):
        # grpc aborts the whole process on a certificate without its key.
        _usage("--tls-cert and --tls-key go together (the client certificate and its key)")
    if not (args.tls_ca or args.tls_cert):
        return None
    return TlsClientConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)


async def _send(args: argparse.Namespace) -> int:
    tls = _tls(args)  # before anything else: a usage error must leave no trace
    if args.file == "-":
        data = sys.stdin.buffer.read()
    elif args.file is not None:
        data = await asyncio.to_thread(Path(args.file).read_bytes)
    else:
        data = (args.data or "").encode()  # UTF-8 checked by the parser (_utf8)
    async with connect(
        [args.url, *args.fallback],
        identity=_identity(args),
        expect_did=args.expect_did,
        tls=tls,
        connect_timeout=args.connect_timeout,
        allow_insecure_fallback=args.allow_insecure_fallback,
    ) as peer:
        out = sys.stdout.buffer
        # A streamed answer is printed whole, one part a line, with or without
        # --stream: the first part alone would be a silently truncated answer.
        streamed, parts = args.stream, 0
        try:
            async for part in peer.stream(args.kind, data, timeout=args.timeout):
                parts += 1
                streamed = streamed or not part.final
                if streamed:
                    out.write(part.data + b"\n")
                else:
                    out.write(part.data)
                    if part.data and not part.data.endswith(b"\n") and out.isatty():
                        out.write(b"\n")
                out.flush()
        except DeadlineExceededError:
            if streamed or parts:
                raise
            raise DeadlineExceededError(
                f"no reply to {args.kind!r} within {args.timeout:g}s (--timeout)"
            ) from None
    return 0


async def _ping(args: argparse.Namespace) -> int:
    from sigwire.transports.base import ClientOptions
    from sigwire.transports.registry import default_registry

    registry = default_registry()
    target = registry.parse(args.url)
    options = ClientOptions(
        identity=Identity.generate(), tls=_tls(args), connect_timeout=args.connect_timeout
    )
    connector = registry.connector(target)
    try:
        if args.expect_did is not None:
            # Health answers are unsigned: the agent's signed card says who answers.
            card = await connector.describe(target, options)
            Verifier().verify_card(card, expected_did=args.expect_did)
        started = time.perf_counter()
        samples = [await connector.health(target, options) for _ in range(args.count)]
        total = time.perf_counter() - started
    finally:
        await registry.aclose()
    rtts = sorted(h.latency * 1000 for h in samples)
    print(
        f"{args.url}: {samples[-1].status}  rtt min {rtts[0]:.2f} ms  "
        f"median {rtts[len(rtts) // 2]:.2f} ms  max {rtts[-1]:.2f} ms  "
        f"({args.count} probes in {total * 1000:.0f} ms)"
    )
    return 0 if samples[-1].status == "SERVING" else 2


async def _describe(args: argparse.Namespace) -> int:
    # A throwaway identity unless --key: an allow-listed agent admits only its list.
    try:
        async with connect(
            args.url,
            identity=Identity.load(args.key) if args.key is not None else Identity.generate(),
            expect_did=args.expect_did,
            tls=_tls(args),
            connect_timeout=args.connect_timeout,
        ) as peer:
            card = await peer.describe()
    except NoTransportAvailableError as exc:
        refused = [e for _, e in exc.attempts if isinstance(e, UnknownSignerError) and e.remote]
        if args.key is None and refused:
            raise SigwireError(
                f"{args.url} does not admit the throwaway identity describe says hello "
                "with (it allow-lists its peers): give --key with a key it admits",
                reason=refused[0].reason,
            ) from None
        raise
    print(
        json.dumps(
            {
                "did": card.did,
                "name": card.name,
                "endpoints": list(card.endpoints),
                "kinds": list(card.kinds),
                "max_message_size": card.max_message_size,
                "protocol_version": card.protocol_version,
                "created_at_ms": card.created_at_ms,
                "signature": "verified",
            },
            indent=2,
        )
    )
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from sigwire.demo import run_demo

    await run_demo()
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _message_size(text: str) -> int:
    value = _positive(text)
    # A signed envelope with its headers needs a few hundred bytes; grpc takes
    # the frame limit that follows from it as a C int.
    if not 1024 <= value or max_frame_size(value) > 2**31 - 1:
        largest = bisect.bisect(range(2**31), 2**31 - 1, key=max_frame_size) - 1
        raise argparse.ArgumentTypeError(f"must be between 1024 and {largest} bytes, not {value}")
    return value


def _seconds(text: str, *, zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, {least}: {text!r}")
    return value


def _duration(text: str) -> float:
    return _seconds(text)


def _grace(text: str) -> float:
    return _seconds(text, zero=True)


def _ws_path(text: str) -> str:
    if not text.startswith("/") or any(c in text for c in "?# ") or not text.isprintable():
        raise argparse.ArgumentTypeError(
            f"must be a URL path starting with '/' (e.g. {DEFAULT_WS_PATH}), not {text!r}"
        )
    return text


def _did_arg(text: str) -> str:
    try:
        public_key_from_did(text)
    except InvalidDidError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def _origin_arg(text: str) -> str:
    if text != ANY_ORIGIN:
        try:
            parse_origin(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _advertise_arg(text: str) -> str:
    try:
        target = parse_target(text)
    except SigwireError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    if target.wildcard:
        raise argparse.ArgumentTypeError(
            f"{text}: a wildcard address is for binding; advertise where clients reach the agent"
        )
    return text


def _utf8(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        # Bytes that are not UTF-8 reach argv as lone surrogates.
        raise argparse.ArgumentTypeError(
            "not valid UTF-8 text; send bytes with --file PATH (or --file - from stdin)"
        ) from None
    return text


def _listen_address(text: str, *, unix: bool = False) -> str:
    if not text or (unix and text.startswith("unix:")):
        return text
    _, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"takes HOST:PORT (e.g. 127.0.0.1:50051; port 0 picks a free one), not {text!r}"
        )
    return text


def _grpc_address(text: str) -> str:
    return _listen_address(text, unix=True)


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expect-did", type=_did_arg, metavar="DID", help="refuse the agent unless it is this DID"
    )
    parser.add_argument("--connect-timeout", type=_duration, default=5.0, metavar="SECONDS")
    parser.add_argument("--tls-ca", help="PEM CA to verify a grpcs:// server with")
    parser.add_argument("--tls-cert", help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")


def _version() -> str:
    try:
        return importlib.metadata.version("sigwire")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sigwire`` command."""
    parser = argparse.ArgumentParser(
        prog="sigwire",
        description="Signed agent-to-agent messaging over gRPC, with a WebSocket fallback.",
    )
    verbose_help = "log what happens; print the traceback of an unexpected error"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    parser.add_argument("--version", action="version", version=f"sigwire {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    key_help = "private key file (default: the per-user key, created on first use)"

    keygen = commands.add_parser("keygen", help="create an Ed25519 identity and print its DID")
    keygen.add_argument("--out", type=Path, required=True, help="key file to write (mode 0600)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    keygen.set_defaults(run=_keygen)

    did = commands.add_parser("did", help="print the did:key of a key file")
    did.add_argument("file", type=Path, nargs="?", help=key_help)
    did.set_defaults(run=_did)

    serve = commands.add_parser("serve", help="run an agent server until SIGTERM/SIGINT")
    serve.add_argument("--key", type=Path, help=key_help)
    serve.add_argument(
        "--grpc",
        type=_grpc_address,
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="default 127.0.0.1:50051; '' to serve WebSocket only",
    )
    serve.add_argument(
        "--ws",
        type=_listen_address,
        metavar="HOST:PORT",
        help="also serve the WebSocket fallback here (default: off)",
    )
    serve.add_argument(
        "--ws-path", type=_ws_path, default=DEFAULT_WS_PATH, help=f"default {DEFAULT_WS_PATH}"
    )
    serve.add_argument("--name", default="", help="name published in the agent card")
    serve.add_argument("--trust", type=Path, help="allow-list: one did:key per line")
    serve.add_argument(
        "--allow-empty-trust",
        action="store_true",
        help="start even when the --trust file lists no DIDs (every sender is refused)",
    )
    serve.add_argument("--tls-cert", help="PEM certificate: serve grpcs://")
    serve.add_argument("--tls-key", help="PEM key of --tls-cert")
    serve.add_argument("--tls-ca", help="PEM CA: require client certificates (mTLS)")
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        type=_origin_arg,
        metavar="ORIGIN",
        help=(
            "let web pages of this origin (https://app.example.com; '*' for any) open "
            "WebSocket streams; by default a browser's handshake (with an Origin header) "
            "is refused (repeatable)"
        ),
    )
    serve.add_argument(
        "--advertise",
        action="append",
        default=[],
        type=_advertise_arg,
        metavar="URL",
        help=(
            "publish this URL in the agent card instead of the bound ones (repeatable, in "
            "preference order); without it a wildcard listener (0.0.0.0, ::) is not published"
        ),
    )
    serve.add_argument(
        "--max-message-size", type=_message_size, default=Limits().max_message_size, metavar="BYTES"
    )
    serve.add_argument(
        "--replay-capacity",
        type=_positive,
        default=ReplayGuard().capacity,
        metavar="N",
        help=(
            "nonces the replay guard remembers, about 210 bytes each (default %(default)s); "
            "beyond N/660 new envelopes per second it forgets the oldest and refuses "
            "envelopes created at or before them: the replay window shrinks to about "
            "N/rate seconds (docs/security.md)"
        ),
    )
    serve.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="callable taking the Server and registering handlers (default: echo, count)",
    )
    serve.add_argument(
        "--grace", type=_grace, default=10.0, metavar="SECONDS", help="drain time on shutdown"
    )
    serve.add_argument(
        "--store",
        type=Path,
        metavar="PATH",
        help="SQLite file keeping the push outbox and reply cache across restarts",
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop when installed (pip install 'sigwire[uvloop]'), else asyncio",
    )
    serve.set_defaults(run=_serve)

    send = commands.add_parser("send", help="send a signed request and print the reply data")
    send.add_argument("url")
    send.add_argument("kind")
    body = send.add_mutually_exclusive_group()
    body.add_argument("--data", type=_utf8, help="payload text (UTF-8)")
    body.add_argument("--file", help="payload file ('-' for stdin)")
    send.add_argument("--key", type=Path, help=key_help)
    send.add_argument(
        "--stream",
        action="store_true",
        help="print replies one a line (a streamed answer is printed so without it too)",
    )
    send.add_argument(
        "--fallback",
        action="append",
        default=[],
        metavar="URL",
        help="try this URL if the ones before fail (repeatable, in order)",
    )
    send.add_argument(
        "--allow-insecure-fallback",
        action="store_true",
        help="allow a plaintext --fallback (grpc://, ws://) after a TLS URL",
    )
    send.add_argument("--timeout", type=_duration, default=30.0, metavar="SECONDS")
    _client_flags(send)
    send.set_defaults(run=_send)

    ping = commands.add_parser("ping", help="print health and round-trip latency")
    ping.add_argument("url")
    ping.add_argument("--count", type=_positive, default=5, help="probes to send (default 5)")
    _client_flags(ping)
    ping.set_defaults(run=_ping)

    describe = commands.add_parser("describe", help="print the agent's verified card")
    describe.add_argument("url")
    describe.add_argument(
        "--key",
        type=Path,
        help="private key to say hello with (default: a throwaway identity; give yours "
        "to describe an agent that allow-lists it)",
    )
    _client_flags(describe)
    describe.set_defaults(run=_describe)

    demo = commands.add_parser("demo", help="two agents on loopback: a signed conversation")
    demo.set_defaults(run=_demo)

    # -v also after the command; SUPPRESS keeps a command's default from
    # overwriting a -v given before it.
    for command in commands.choices.values():
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
        )
    return parser


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise SigwireError(
                "uvloop is not installed (pip install 'sigwire[uvloop]')", reason="INTERNAL"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _stdout_closed() -> int:
    # The reader went away (`sigwire ... | head -1`): end quietly, and point
    # stdout at /dev/null so that flushing it at exit cannot fail again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace) -> int:
    result = args.run(args)
    if not asyncio.iscoroutine(result):
        return int(result)
    with asyncio.Runner(loop_factory=_loop_factory(getattr(args, "loop", "asyncio"))) as runner:
        status: int = runner.run(result)
    return status


def _headline(error: SigwireError) -> str:
    """What to tell the operator: when every URL answered as another agent, only that."""
    if isinstance(error, NoTransportAvailableError) and error.attempts:
        wrong = [e for _, e in error.attempts if isinstance(e, UnknownSignerError) and e.expected]
        if len(wrong) == len(error.attempts):
            return str(wrong[0])
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status = _run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except _CommandError as exc:
        print(f"sigwire: error: {exc}", file=sys.stderr)
        return exc.status
    except (SigwireError, OSError) as exc:
        problem = _headline(exc) if isinstance(exc, SigwireError) else str(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.verbose:
            log.exception("unexpected error")
        hint = "" if args.verbose else "; rerun with -v for the traceback"
        problem = f"unexpected {type(exc).__name__}: {exc} (a bug{hint})"
    print(f"sigwire: error: {problem}", file=sys.stderr)
    return 1
