"""The grpc.aio listener: AgentTransport, grpc.health.v1 and server reflection.

Methods are registered with raw-bytes (de)serializers so that undecodable
input reaches sigwire's own decoding and gets INVALID_ARGUMENT with a
MALFORMED ErrorInfo, instead of grpc's generic deserialization failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from sigwire import _proto
from sigwire.dispatch import internal_error
from sigwire.envelope import Envelope, Reply
from sigwire.errors import (
    ConnectionClosedError,
    MessageTooLargeError,
    SigwireError,
    error_from_wire,
)
from sigwire.session import max_frame_size
from sigwire.transports.base import ServerCore, TlsServerConfig
from sigwire.transports.grpc.errors import abort_args

__all__ = ["SERVICE_NAME", "GrpcListener", "ServerCore", "TlsServerConfig", "grpc_options"]

log = logging.getLogger("sigwire.server")

SERVICE_NAME = "sigwire.v1.AgentTransport"
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


def grpc_options(max_message_size: int, keepalive: float) -> list[tuple[str, int]]:
    """Channel/server options shared by both ends."""
    # Frames carry batches of envelopes plus their fields; leave room above the
    # payload limit so that sigwire, not grpc, reports PAYLOAD_TOO_LARGE with details.
    frame_limit = max_frame_size(max_message_size)
    return [
        ("grpc.max_receive_message_length", frame_limit),
        ("grpc.max_send_message_length", frame_limit),
        ("grpc.keepalive_time_ms", int(keepalive * 1000)),
        ("grpc.keepalive_timeout_ms", int(max(1.0, keepalive / 2) * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Identity only: grpc applies the receive limit after inflating, so a
        # few KB of gzip would cost a whole frame's worth of memory and CPU.
        # A compressed message is refused (UNIMPLEMENTED) before it is inflated.
        ("grpc.compression_enabled_algorithms_bitset", 1),
    ]


class _ServerStream:
    """A Connect stream seen from the server, over a servicer context."""

    def __init__(self, context: grpc.aio.ServicerContext[bytes, bytes], limit: int) -> None:
        self._context = context
        self._limit = limit

    async def send(self, data: bytes) -> None:
        try:
            await self._context.write(data)
        except Exception as exc:
            raise ConnectionClosedError(f"stream write failed: {exc!r}") from None

    async def recv(self) -> bytes | None:
        try:
            data = await self._context.read()
        except Exception as exc:
            raise ConnectionClosedError(f"stream read failed: {exc!r}") from None
        if data is _EOF:
            return None
        assert isinstance(data, bytes)
        if len(data) > self._limit:
            raise MessageTooLargeError(len(data), self._limit)
        return data

    async def close(self, reason: str = "", message: str = "") -> None:
        # Returning from the Connect handler ends the RPC; nothing to do here.
        return


def _forget(exc: BaseException) -> None:
    # An error that ends a call outlives it (grpc keeps the last aborted calls'
    # state): its traceback would keep the frames that decoded the request.
    exc.__traceback__ = exc.__context__ = None


class _Servicer:
    def __init__(self, core: ServerCore) -> None:
        self.core = core
        self.limit = core.dispatcher.limits.max_message_size

    def _decode(self, request: bytes) -> Envelope:
        if len(request) > self.limit + 64 * 1024:
            raise MessageTooLargeError(len(request), self.limit)
        return _proto.decode_envelope(request)

    async def Send(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            envelope = self._decode(request)
            final: Reply | None = None
            async for reply in self.core.dispatcher.dispatch(envelope, unary=True):
                final = reply
            assert final is not None
            if not final.success and final.error is not None:
                err = final.error
                raise error_from_wire(err.reason, err.message, err.details)
            return _proto.reply_to_pb(final).SerializeToString()
        except SigwireError as exc:
            _forget(exc)
            del request  # grpc keeps aborted calls, and through them this frame
            await context.abort(*abort_args(exc))
            raise  # unreachable: abort raises
        except Exception:
            error = internal_error("Send from %s failed", context.peer())
            await context.abort(*abort_args(error))
            raise  # unreachable: abort raises

    async def SendStream(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        try:
            envelope = self._decode(request)
            async for reply in self.core.dispatcher.dispatch(envelope):
                if not reply.success and reply.error is not None:
                    err = reply.error
                    raise error_from_wire(err.reason, err.message, err.details)
                yield _proto.reply_to_pb(reply).SerializeToString()
        except SigwireError as exc:
            _forget(exc)
            del request  # grpc keeps aborted calls, and through them this frame
            await context.abort(*abort_args(exc))
        except Exception:
            error = internal_error("SendStream from %s failed", context.peer())
            await context.abort(*abort_args(error))

    async def Connect(
        self, request_iterator: object, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        stream = _ServerStream(context, max_frame_size(self.limit))
        try:
            session = self.core.new_session(stream, f"grpc {context.peer()}")
            await session.run()
        except Exception:
            failed = internal_error("Connect from %s failed", context.peer())
            await context.abort(*abort_args(failed))
            raise  # unreachable: abort raises
        error = session.error
        if error is not None and not isinstance(error, ConnectionClosedError):
            # The peer broke the protocol (undecodable frame, ignored window):
            # say why in the status, as for any other call.
            await context.abort(*abort_args(error))

    async def Describe(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        try:
            return _proto.card_to_pb(self.core.card()).SerializeToString()
        except Exception:
            error = internal_error("Describe from %s failed", context.peer())
            await context.abort(*abort_args(error))
            raise  # unreachable: abort raises


def _read(path: str) -> bytes:
    # Small PEM files read once at start-up; not worth a thread hop.
    return Path(path).read_bytes()


def _bind_problem(address: str) -> str | None:
    """Why the OS refuses to listen on TCP ``address``, found by binding a plain socket there."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, ValueError) as exc:
        return f"unknown host or port ({getattr(exc, 'strerror', None) or exc})"
    # grpc serves if it can bind any of the resolved addresses: a problem only
    # when none can be bound.
    problem = None
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                problem = "address already in use (stop what holds it, or choose another port)"
            else:
                problem = problem or exc.strerror or str(exc)
        else:
            return None
    return problem


def _identity(data: bytes) -> bytes:
    return data


class GrpcListener:
    """One grpc.aio server bound to one address.

    Args:
        core: The sigwire server it serves.
        address: ``HOST:PORT`` (port 0 picks a free one) or ``unix:/path``.
        tls: Certificate and key for ``grpcs://``; plaintext ``grpc://`` if None.
        keepalive: Seconds between HTTP/2 keepalive pings.
    """

    def __init__(
        self,
        core: ServerCore,
        address: str,
        *,
        tls: TlsServerConfig | None = None,
        keepalive: float = 20.0,
    ) -> None:
        self.core = core
        self.address = address
        self.tls = tls
        self.keepalive = keepalive
        self.url = ""
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()

    async def start(self) -> str:
        """Bind and start serving; returns the bound URL (e.g. ``grpc://127.0.0.1:50123``)."""
        limits = self.core.dispatcher.limits
        options = [
            *grpc_options(limits.max_message_size, self.keepalive),
            ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
            ("grpc.http2.min_ping_interval_without_data_ms", 1000),
            # Never share a port with another process's listener.
            ("grpc.so_reuseport", 0),
            # Nothing here serves channelz; its per-connection socket node costs
            # ~0.6 KB of RSS per peer (measured with 1,000 idle Connect streams).
            ("grpc.enable_channelz", 0),
        ]
        server = grpc.aio.server(options=options)
        servicer = _Servicer(self.core)
        handlers = {
            "Send": grpc.unary_unary_rpc_method_handler(
                servicer.Send, request_deserializer=_identity, response_serializer=_identity
            ),
            "SendStream": grpc.unary_stream_rpc_method_handler(
                servicer.SendStream, request_deserializer=_identity, response_serializer=_identity
            ),
            "Connect": grpc.stream_stream_rpc_method_handler(
                servicer.Connect, request_deserializer=_identity, response_serializer=_identity
            ),
            "Describe": grpc.unary_unary_rpc_method_handler(
                servicer.Describe, request_deserializer=_identity, response_serializer=_identity
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        unix = self.address.startswith("unix:")
        # grpc reports a failed bind only as "Failed to bind" (after logging it
        # from C-core): a plain socket says why, before grpc is asked.
        problem = None if unix else _bind_problem(self.address)
        if problem is not None:
            raise OSError(f"cannot serve gRPC on {self.address}: {problem}")
        if self.tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(_read(self.tls.key_file), _read(self.tls.cert_file))],
                root_certificates=_read(self.tls.client_ca_file)
                if self.tls.client_ca_file
                else None,
                require_client_auth=self.tls.client_ca_file is not None,
            )
            bind = functools.partial(server.add_secure_port, self.address, credentials)
        else:
            bind = functools.partial(server.add_insecure_port, self.address)
        try:
            port = bind()
        except RuntimeError:
            port = 0
            unix = False
        if not unix and port == 0:
            raise OSError(
                f"cannot serve gRPC on {self.address}: grpc could not bind it"
                + (" (do the TLS certificate and key match?)" if self.tls else "")
            )
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if unix:
            self.url = "unix://" + self.address.removeprefix("unix:").removeprefix("//")
        else:
            host = self.address.rsplit(":", 1)[0]
            self.url = f"{'grpcs' if self.tls else 'grpc'}://{host}:{port}"
        return self.url

    async def drain(self) -> None:
        """Report NOT_SERVING to health checks from now on."""
        await self._health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Stop the grpc server; open RPCs get ``grace`` seconds, then are cancelled."""
        server, self._server = self._server, None
        if server is None:
            return
        await self.drain()
        with contextlib.suppress(asyncio.CancelledError):
            await server.stop(grace)
