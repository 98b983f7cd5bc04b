"""The grpc.aio client side: pooled channels, a real readiness probe, streams.

``open()`` proves reachability before returning: it waits for the channel to
become READY (TCP + TLS + HTTP/2 settings exchanged) within the connect
timeout, so an endpoint that refuses, black-holes, or speaks only HTTP/1.1
fails fast with :class:`~sigwire.errors.ConnectError` and a reason.

grpc tells a failed channel apart from a working one, not why it failed: when
a ``grpcs://`` channel fails, one TLS handshake by the ``ssl`` module, with
the same certificates, finds out which side refused what, and the error says it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sigwire import _proto
from sigwire.envelope import AgentCard
from sigwire.errors import ConnectError, ConnectionClosedError
from sigwire.targets import Target
from sigwire.transports.base import ClientOptions, Health, TlsClientConfig
from sigwire.transports.grpc.errors import error_from_rpc
from sigwire.transports.grpc.server import SERVICE_NAME, grpc_options

__all__ = ["GrpcConnector"]

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
_CONNECT = f"/{SERVICE_NAME}/Connect"
_DESCRIBE = f"/{SERVICE_NAME}/Describe"


_Key = tuple[object, ...]


def _identity(data: bytes) -> bytes:
    return data


@dataclasses.dataclass(slots=True)
class _Pooled:
    channel: grpc.aio.Channel
    users: int = 0


class _ClientStream:
    """A Connect call as a FrameStream."""

    def __init__(self, call: grpc.aio.StreamStreamCall[bytes, bytes], url: str, release: object):
        self._call: grpc.aio.StreamStreamCall[bytes, bytes] | None = call
        self._url = url
        self._release = release
        self._closed = False

    def _open_call(self) -> grpc.aio.StreamStreamCall[bytes, bytes]:
        call = self._call
        if call is None:
            raise ConnectionClosedError(f"{self._url}: stream closed")
        return call

    async def send(self, data: bytes) -> None:
        call = self._open_call()
        try:
            await call.write(data)
        except grpc.aio.AioRpcError as exc:
            raise ConnectionClosedError(str(error_from_rpc(exc, url=self._url))) from None
        except Exception as exc:
            raise ConnectionClosedError(f"{self._url}: stream closed ({exc!r})") from None

    async def recv(self) -> bytes | None:
        call = self._open_call()
        try:
            data = await call.read()
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc(exc, url=self._url)
            if isinstance(err, ConnectionClosedError):
                raise err from None
            raise ConnectionClosedError(str(err), reason=err.reason) from None
        except Exception as exc:
            raise ConnectionClosedError(f"{self._url}: stream closed ({exc!r})") from None
        if data is _EOF:
            return None
        assert isinstance(data, bytes)
        return data

    async def close(self, reason: str = "", message: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        # Without this reference, grpc.aio closes the connection now: while the
        # call is referenced (the peer object holds it through reference
        # cycles), the TCP connection stays open until the garbage collector runs.
        del call
        release = self._release
        assert callable(release)
        await release()


class GrpcConnector:
    """Opens Connect streams over pooled grpc.aio channels.

    One channel per (scheme, endpoint, TLS settings) is shared by every stream
    to that endpoint and closed when its last user is done.
    """

    def __init__(self) -> None:
        self._pool: dict[_Key, _Pooled] = {}

    def _key(self, target: Target, options: ClientOptions) -> _Key:
        return (target.scheme, target.authority, target.path, options.tls, options.max_message_size)

    def _acquire(self, target: Target, options: ClientOptions) -> tuple[_Key, _Pooled]:
        key = self._key(target, options)
        pooled = self._pool.get(key)
        if pooled is None:
            pooled = self._pool[key] = _Pooled(self._new_channel(target, options))
        pooled.users += 1
        return key, pooled

    async def _release(self, key: _Key, pooled: _Pooled) -> None:
        pooled.users -= 1
        if pooled.users <= 0 and self._pool.get(key) is pooled:
            del self._pool[key]
            with contextlib.suppress(Exception):
                await pooled.channel.close(grace=None)

    @staticmethod
    def _new_channel(target: Target, options: ClientOptions) -> grpc.aio.Channel:
        channel_options: list[tuple[str, int | str]] = [
            *grpc_options(options.max_message_size, options.keepalive),
            # sigwire's own backoff paces reconnection; keep grpc's short. (Not
            # grpc.min_reconnect_backoff_ms: despite its name it is the minimum
            # connect timeout, and a short one fails every slow handshake.)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),
            # Share connections only through this connector's own pool: grpc's
            # process-wide subchannel pool would put every peer in a process on
            # one HTTP/2 connection and its 100-stream limit.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if target.scheme == "unix":
            return grpc.aio.insecure_channel(f"unix:{target.path}", options=channel_options)
        if not target.tls:
            return grpc.aio.insecure_channel(target.authority, options=channel_options)
        tls = options.tls or TlsClientConfig()
        if tls.server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls.server_name))
        _check_tls_files(target, tls)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(tls.ca_file).read_bytes() if tls.ca_file else None,
            private_key=Path(tls.key_file).read_bytes() if tls.key_file else None,
            certificate_chain=Path(tls.cert_file).read_bytes() if tls.cert_file else None,
        )
        return grpc.aio.secure_channel(target.authority, credentials, options=channel_options)

    async def _ready(
        self,
        channel: grpc.aio.Channel,
        target: Target,
        timeout: float,
        tls: TlsClientConfig | None = None,
    ) -> None:
        # Fail fast: a connection attempt that ends in TRANSIENT_FAILURE
        # (refused, reset, not HTTP/2, TLS refused) is an answer; only a
        # silent endpoint costs the whole timeout. A TRANSIENT_FAILURE left
        # over from before this call is not: wait for a fresh attempt. From
        # IDLE, get_state(try_to_connect=True) starts one, and a refusal may
        # take the channel straight to TRANSIENT_FAILURE, never showing
        # CONNECTING; and once there, pick_first stays there while it retries.
        starting = (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)
        failed = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        state = channel.get_state(try_to_connect=True)
        attempted = False
        try:
            async with asyncio.timeout(timeout):
                while state != grpc.ChannelConnectivity.READY:
                    if state in starting:
                        attempted = True
                    elif state == failed and attempted:
                        problem = "connection failed (refused, reset, not gRPC, or TLS refused)"
                        if target.tls:
                            problem = await _tls_problem(target, tls) or problem
                        raise ConnectError(
                            f"{target.url}: {problem}",
                            details={"url": target.url, "state": state.name},
                        )
                    await channel.wait_for_state_change(state)
                    state = channel.get_state(try_to_connect=True)
        except TimeoutError:
            raise ConnectError(
                f"{target.url}: not ready within {timeout:g}s (channel {state.name}; "
                "the endpoint accepted nothing or never answered)",
                details={"url": target.url, "state": state.name},
            ) from None

    async def open(self, target: Target, options: ClientOptions) -> _ClientStream:
        """Probe ``target`` and open a Connect stream on a pooled channel."""
        key, pooled = self._acquire(target, options)
        try:
            await self._ready(pooled.channel, target, options.connect_timeout, options.tls)
            call = pooled.channel.stream_stream(
                _CONNECT, request_serializer=_identity, response_deserializer=_identity
            )(None)
        except BaseException:
            await self._release(key, pooled)
            raise

        async def release() -> None:
            await self._release(key, pooled)

        return _ClientStream(call, target.url, release)

    @contextlib.asynccontextmanager
    async def _ready_channel(
        self, target: Target, options: ClientOptions
    ) -> AsyncIterator[grpc.aio.Channel]:
        key, pooled = self._acquire(target, options)
        try:
            await self._ready(pooled.channel, target, options.connect_timeout, options.tls)
            yield pooled.channel
        finally:
            await self._release(key, pooled)

    async def health(self, target: Target, options: ClientOptions) -> Health:
        """Call grpc.health.v1 Check and time it."""
        async with self._ready_channel(target, options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            started = time.perf_counter()
            try:
                response = await stub.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=options.connect_timeout
                )
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc, url=target.url) from None
            latency = time.perf_counter() - started
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return Health(status=status, latency=latency)

    async def describe(self, target: Target, options: ClientOptions) -> AgentCard:
        """Fetch the agent's signed card (not yet verified)."""
        async with self._ready_channel(target, options) as channel:
            method = channel.unary_unary(
                _DESCRIBE, request_serializer=_identity, response_deserializer=_identity
            )
            try:
                data = await method(b"", timeout=options.connect_timeout)
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc, url=target.url) from None
        assert isinstance(data, bytes)
        return _proto.decode_card(data)

    async def aclose(self) -> None:
        """Close every pooled channel."""
        pool, self._pool = self._pool, {}
        for pooled in pool.values():
            with contextlib.suppress(Exception):
                await pooled.channel.close(grace=None)


def _check_tls_files(target: Target, tls: TlsClientConfig) -> None:
    """Check the client's TLS files with the ssl module before grpc reads them.

    grpc aborts the process (a failed CHECK) on a certificate without its key,
    and reports a CA file holding no certificate, or a key that does not
    match its certificate, only as "Failed to create security handshaker".

    Raises:
        ConnectError: A file is missing, unreadable, or not what it should be.
    """
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConnectError(
            f"{target.url}: a client certificate needs its key (cert_file and key_file go together)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if tls.ca_file:
            context.load_verify_locations(cafile=tls.ca_file)
    except (OSError, ValueError) as exc:
        raise ConnectError(f"{target.url}: CA file {tls.ca_file}: {_reason(exc)}") from None
    try:
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ValueError) as exc:
        raise ConnectError(
            f"{target.url}: client certificate {tls.cert_file} with key {tls.key_file}: "
            f"{_reason(exc)}"
        ) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return {
            "KEY_VALUES_MISMATCH": "the key does not match the certificate",
            "NO_CERTIFICATE_OR_CRL_FOUND": "no PEM certificate in it",
        }.get(exc.reason, exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


async def _tls_problem(target: Target, tls: TlsClientConfig | None) -> str | None:
    """What fails in a TLS handshake with ``target``, and what to do; None if nothing does.

    One handshake with the ssl module, offering what grpc offers (the same
    roots, client certificate, name and ALPN ``h2``), then one read: a gRPC
    server's first bytes are its HTTP/2 SETTINGS, so a server that closes
    the connection instead has refused the client's certificate (or its absence).
    """
    tls = tls or TlsClientConfig()
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ValueError):
        return None  # the files changed since the channel was made; no diagnosis
    context.set_alpn_protocols(["h2"])
    name = tls.server_name or target.host
    try:
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=context, server_hostname=name
        )
    except ssl.SSLCertVerificationError as exc:
        return (
            f"the server's certificate is not trusted ({exc.verify_message}): give the CA "
            "that signed it (--tls-ca, TlsClientConfig.ca_file), or the name it is issued "
            "for (server_name)"
        )
    except ssl.SSLError as exc:
        if exc.reason == "WRONG_VERSION_NUMBER":
            return "the server does not speak TLS on this port (grpc:// instead of grpcs://?)"
        if exc.reason in _REFUSED_CERT:
            return _refused(tls, exc.reason)
        return f"TLS handshake failed ({exc.reason or exc})"
    except OSError:
        return None  # not a TLS problem: the caller's message stands
    try:
        async with asyncio.timeout(_FIRST_BYTES_TIMEOUT):
            first = await reader.read(1)
    except ssl.SSLError as exc:
        if exc.reason in _REFUSED_CERT:
            return _refused(tls, exc.reason)
        return f"TLS failed after the handshake ({exc.reason or exc})"
    except TimeoutError:
        return None  # a TLS server, but not one that speaks first as gRPC does
    except OSError:
        first = b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return None if first else _refused(tls, None)


# TLS alerts with which a server refuses a client certificate (or its absence).
_REFUSED_CERT = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
    }
)
# A gRPC server sends its HTTP/2 SETTINGS as soon as the handshake ends.
_FIRST_BYTES_TIMEOUT = 2.0


def _refused(tls: TlsClientConfig, alert: str | None) -> str:
    said = f" ({alert})" if alert else " (it closed the connection after the TLS handshake)"
    if not tls.cert_file:
        return (
            f"the server requires a client certificate{said}: give one signed by a CA it "
            "trusts (--tls-cert and --tls-key, TlsClientConfig.cert_file and key_file)"
        )
    return (
        f"the server refused the client certificate {tls.cert_file}{said}: it must be "
        "signed by a CA the server trusts (its --tls-ca) and be valid for client auth"
    )
