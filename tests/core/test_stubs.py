"""The committed generated stubs match a fresh scripts/gen-protos and expose the service."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "generated" / "sigwire_pb"


def _files(root: Path) -> set[str]:
    return {
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.mark.skipif(shutil.which("bash") is None, reason="scripts/gen-protos is a bash script")
def test_generated_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    """scripts/gen-protos into a temporary directory reproduces generated/ byte for byte."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-protos"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=6 * TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    fresh = tmp_path / "sigwire_pb"
    assert _files(fresh) == _files(GENERATED)
    assert "v1/transport_pb2_grpc.py" in _files(fresh)
    for name in sorted(_files(fresh)):
        assert filecmp.cmp(fresh / name, GENERATED / name, shallow=False), (
            f"generated/sigwire_pb/{name} differs from a fresh scripts/gen-protos; "
            "run scripts/gen-protos and commit the result"
        )


def test_transport_service_stub_imports() -> None:
    """sigwire_pb.v1.transport_pb2_grpc imports and declares the four AgentTransport methods."""
    from sigwire_pb.v1 import transport_pb2_grpc

    servicer = transport_pb2_grpc.AgentTransportServicer
    for method in ("Send", "SendStream", "Connect", "Describe"):
        assert callable(getattr(servicer, method))
    assert callable(transport_pb2_grpc.AgentTransportStub)
    assert callable(transport_pb2_grpc.add_AgentTransportServicer_to_server)


def test_service_descriptor_shapes() -> None:
    """The AgentTransport methods have the documented streaming shapes and message types."""
    from sigwire_pb.v1 import transport_pb2

    service = transport_pb2.DESCRIPTOR.services_by_name["AgentTransport"]
    assert service.full_name == "sigwire.v1.AgentTransport"
    shapes = {
        method.name: (
            method.client_streaming,
            method.server_streaming,
            method.input_type.name,
            method.output_type.name,
        )
        for method in service.methods
    }
    assert shapes == {
        "Send": (False, False, "Envelope", "Reply"),
        "SendStream": (False, True, "Envelope", "Reply"),
        "Connect": (True, True, "Frame", "Frame"),
        "Describe": (False, False, "DescribeRequest", "AgentCard"),
    }
