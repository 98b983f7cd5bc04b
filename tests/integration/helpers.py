"""Helpers of the gRPC integration tests: envelopes, raw RPCs, a cuttable TCP proxy, certs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2, status_pb2

import sigwire
from sigwire import _proto
from sigwire_pb.v1 import messages_pb2
from sigwire_pb.v1 import transport_pb2_grpc as transport_grpc

DETAILS_KEY = "grpc-status-details-bin"
FAST_BACKOFF = sigwire.Backoff(initial=0.05, maximum=0.2, attempts=None)
"""Reconnect quickly and for ever (every wait in a test is bounded by TIMEOUT)."""
DOMAIN = "sigwire.dev"


def authority(url: str) -> str:
    """``HOST:PORT`` of a ``grpc://`` or ``grpcs://`` URL."""
    return url.split("://", 1)[1]


def port_of(url: str) -> int:
    """The port of a ``grpc://HOST:PORT`` URL."""
    return int(url.rsplit(":", 1)[1])


def envelope(
    identity: sigwire.Identity,
    kind: str,
    payload: bytes = b"",
    *,
    recipient: str = "",
    sign: bool = True,
    **fields: Any,
) -> sigwire.Envelope:
    """A fresh envelope from ``identity``, signed unless ``sign`` is False.

    ``fields`` replace envelope fields before signing (e.g. ``created_at_ms``, ``nonce``).
    """
    env = sigwire.Envelope.new(kind, payload, sender=identity.did, recipient=recipient)
    if fields:
        env = dataclasses.replace(env, **fields)
    return identity.sign_envelope(env) if sign else env


def to_pb(env: sigwire.Envelope) -> messages_pb2.Envelope:
    """The protobuf form of an envelope, as any gRPC client would send it."""
    return _proto.envelope_to_pb(env)


def stub(channel: grpc.aio.Channel) -> transport_grpc.AgentTransportStub:
    """The generated AgentTransport stub on ``channel``."""
    return transport_grpc.AgentTransportStub(channel)


def raw_send(channel: grpc.aio.Channel) -> Any:
    """``Send`` taking raw request bytes (no serializer), for undecodable input."""
    return channel.unary_unary(
        "/sigwire.v1.AgentTransport/Send",
        request_serializer=None,
        response_deserializer=messages_pb2.Reply.FromString,
    )


def verify_reply(
    reply_pb: messages_pb2.Reply, request: sigwire.Envelope, responder: str
) -> sigwire.Reply:
    """The sigwire Reply of ``reply_pb`` after checking it answers ``request``, signed."""
    reply = _proto.reply_from_pb(reply_pb)
    sigwire.Verifier().verify_reply(reply, request, expected_responder=responder)
    return reply


@dataclasses.dataclass(frozen=True)
class RpcFailure:
    """What a failed RPC carried: status code, message, and the google.rpc details."""

    code: grpc.StatusCode
    message: str
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo
    retry: error_details_pb2.RetryInfo | None


def rpc_failure(exc: grpc.aio.AioRpcError) -> RpcFailure:
    """Parse ``grpc-status-details-bin``; fails the test if there is no sigwire ErrorInfo."""
    blobs = [v for k, v in (exc.trailing_metadata() or ()) if k == DETAILS_KEY]
    assert len(blobs) == 1, f"no {DETAILS_KEY} trailer in {exc!r}"
    status = status_pb2.Status.FromString(blobs[0])
    infos, retries = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retries.append(retry)
    assert len(infos) == 1, f"expected one ErrorInfo, got {status}"
    assert infos[0].domain == DOMAIN
    assert status.code == exc.code().value[0], "Status.code disagrees with the RPC status"
    return RpcFailure(
        code=exc.code(),
        message=exc.details() or "",
        status=status,
        info=infos[0],
        retry=retries[0] if retries else None,
    )


# -- a TCP forwarder the tests can cut, black-hole and pause -------------------------


class TcpProxy:
    """A 127.0.0.1 TCP forwarder to ``upstream_port`` that a test can break on purpose.

    ``cut()`` aborts every piped connection (both sides see a reset) while the
    proxy keeps listening; ``black_hole()`` keeps sockets open but drops every
    byte in both directions (new connections included) until ``resume()``;
    ``pause()`` cuts and stops listening, holding the port with a bound,
    non-listening socket so that connecting is refused at once, until
    ``listen()`` serves the same port again. ``reset()`` sends a TCP RST on
    every piped connection; ``latency`` (seconds) delays every chunk.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._placeholder: socket.socket | None = None
        self._forwarding = True
        self.latency = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        """Client connections piped now (one ends when either side closes it)."""
        return len(self._tasks)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/sigwire/v1"

    async def listen(self) -> None:
        """Accept connections (on the same port as before, if any)."""
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.accepted += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._writers.add(upstream)
            await asyncio.gather(self._pump(reader, upstream), self._pump(up_reader, writer))
        except OSError:
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.transport.abort()
                    self._writers.discard(w)
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.latency:
                    await asyncio.sleep(self.latency)
                if self._forwarding:
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        """Abort every piped connection; keep listening."""
        for writer in list(self._writers):
            writer.transport.abort()

    def reset(self) -> None:
        """Send a TCP RST on every piped connection; keep listening."""
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    def black_hole(self) -> None:
        """Drop all traffic, keeping every socket open."""
        self._forwarding = False

    def resume(self) -> None:
        """Forward traffic again (after :meth:`black_hole`)."""
        self._forwarding = True

    async def pause(self) -> None:
        """Cut every connection and refuse new ones, keeping the port."""
        await self._stop_listening()
        self.cut()
        placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        placeholder.bind(("127.0.0.1", self.port))
        self._placeholder = placeholder

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def aclose(self) -> None:
        await self._stop_listening()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._placeholder is not None:
            self._placeholder.close()


# -- certificates ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Certs:
    """PEM files of a test PKI."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    names: Iterable[x509.GeneralName] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    names = list(names)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_certs(directory: Path) -> Certs:
    """A CA, a server cert for 127.0.0.1 and localhost, a client cert, and an unrelated CA."""
    ca, ca_key = _ca("sigwire test CA")
    server, server_key = _leaf(
        ca,
        ca_key,
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    client, client_key = _leaf(ca, ca_key, "sigwire test client", ExtendedKeyUsageOID.CLIENT_AUTH)
    other, _ = _ca("unrelated CA")
    return Certs(
        ca=_write_cert(directory / "ca.pem", ca),
        server_cert=_write_cert(directory / "server.pem", server),
        server_key=_write_key(directory / "server.key", server_key),
        client_cert=_write_cert(directory / "client.pem", client),
        client_key=_write_key(directory / "client.key", client_key),
        other_ca=_write_cert(directory / "other-ca.pem", other),
    )


@contextlib.contextmanager
def dead_socket() -> Iterator[socket.socket]:
    """A socket bound to 127.0.0.1:0 that never listens: connecting is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock
    finally:
        sock.close()
