"""The gRPC transport (grpc.aio): the only place in sigwire that imports grpc."""

from sigwire.transports.grpc.client import GrpcConnector
from sigwire.transports.grpc.server import GrpcListener

__all__ = ["GrpcConnector", "GrpcListener"]
