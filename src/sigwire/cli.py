"""The ``sigwire`` command line (argparse: the stdlib parser is enough here).

Commands that need an identity take ``--key FILE`` and default to the per-user
key (:func:`sigwire.keyfile.default_key_path`), created on first use.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from sigwire.client import connect
from sigwire.dispatch import Limits
from sigwire.errors import (
    InvalidDidError,
    NoTransportAvailableError,
    SigwireError,
    UnknownSignerError,
)
from sigwire.keyfile import default_key_path, load_allow_list, load_or_create_identity
from sigwire.signing import Identity, ReplayGuard, Verifier, public_key_from_did
from sigwire.targets import ANY_ORIGIN, DEFAULT_WS_PATH, parse_origin, parse_target
from sigwire.transports.base import TlsClientConfig

if TYPE_CHECKING:
    from sigwire.server import Server

__all__ = ["build_parser", "build_server", "main"]

log = logging.getLogger("sigwire.cli")


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
    return load_or_create_identity()


def _load_app(spec: str) -> Callable[[Any], None]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"sigwire: error: --app takes module:attr, not {spec!r}")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise SystemExit(f"sigwire: error: {spec} is not callable")
    return target  # type: ignore[no-any-return]


def build_server(args: argparse.Namespace) -> Server:
    """The Server that ``sigwire serve ARGS`` runs, handlers included (not started)."""
    from sigwire.demo import add_builtin_handlers
    from sigwire.server import Server
    from sigwire.transports.base import TlsServerConfig

    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("sigwire: error: --tls-cert and --tls-key go together")
    tls = TlsServerConfig(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    server = Server(
        _identity(args),
        grpc=args.grpc or None,
        ws=args.ws,
        ws_path=args.ws_path,
        name=args.name,
        trust=load_allow_list(args.trust) if args.trust else None,
        limits=Limits(max_message_size=args.max_message_size),
        tls=tls,
        store=args.store,
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
        data = (args.data or "").encode()
    async with connect(
        [args.url, *args.fallback],
        identity=_identity(args),
        expect_did=args.expect_did,
        tls=tls,
        connect_timeout=args.connect_timeout,
        allow_insecure_fallback=args.allow_insecure_fallback,
    ) as peer:
        out = sys.stdout.buffer
        if args.stream:
            async for part in peer.stream(args.kind, data, timeout=args.timeout):
                out.write(part.data + b"\n")
                out.flush()
        else:
            reply = await peer.request(args.kind, data, timeout=args.timeout)
            out.write(reply.data)
            if reply.data and not reply.data.endswith(b"\n") and out.isatty():
                out.write(b"\n")
            out.flush()
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


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expect-did", type=_did_arg, metavar="DID", help="refuse the agent unless it is this DID"
    )
    parser.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--tls-ca", help="PEM CA to verify a grpcs:// server with")
    parser.add_argument("--tls-cert", help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sigwire`` command."""
    parser = argparse.ArgumentParser(
        prog="sigwire",
        description="Signed agent-to-agent messaging over gRPC, with a WebSocket fallback.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
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
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="default 127.0.0.1:50051; '' to serve WebSocket only",
    )
    serve.add_argument(
        "--ws",
        metavar="HOST:PORT",
        help="also serve the WebSocket fallback here (default: off)",
    )
    serve.add_argument("--ws-path", default=DEFAULT_WS_PATH, help=f"default {DEFAULT_WS_PATH}")
    serve.add_argument("--name", default="", help="name published in the agent card")
    serve.add_argument("--trust", type=Path, help="allow-list: one did:key per line")
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
        "--max-message-size", type=int, default=Limits().max_message_size, metavar="BYTES"
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
    serve.add_argument("--grace", type=float, default=10.0, help="drain time on shutdown")
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
    body.add_argument("--data", help="payload text")
    body.add_argument("--file", help="payload file ('-' for stdin)")
    send.add_argument("--key", type=Path, help=key_help)
    send.add_argument("--stream", action="store_true", help="print streamed replies, one a line")
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
    send.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    _client_flags(send)
    send.set_defaults(run=_send)

    ping = commands.add_parser("ping", help="print health and round-trip latency")
    ping.add_argument("url")
    ping.add_argument("--count", type=int, default=5)
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
        result = args.run(args)
        if asyncio.iscoroutine(result):
            with asyncio.Runner(loop_factory=_loop_factory(getattr(args, "loop", "asyncio"))) as r:
                status: int = r.run(result)
        else:
            status = result
    except SigwireError as exc:
        print(f"sigwire: error: {_headline(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sigwire: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
