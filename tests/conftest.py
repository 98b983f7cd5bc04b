"""Shared test settings, and the identities of the network suites' servers and clients.

TIMEOUT bounds every wait on a future or event; scale it on slow machines with
SIGWIRE_TEST_TIMEOUT_SCALE (e.g. 3). Tests never sleep to wait for state.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import settings

import sigwire
from sigwire import signing

TIMEOUT_SCALE = float(os.environ.get("SIGWIRE_TEST_TIMEOUT_SCALE", "1"))
TIMEOUT = 10.0 * TIMEOUT_SCALE

# Property tests draw the same examples on every run: a failure found once is
# found again, and CI never turns red by chance. (SIGWIRE_HYPOTHESIS=explore
# draws fresh examples, to hunt for new failures locally.)
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("SIGWIRE_HYPOTHESIS", "ci"))


@pytest.fixture
def server_identity() -> sigwire.Identity:
    """The identity of the test server."""
    return sigwire.Identity.generate()


@pytest.fixture
def client_identity() -> sigwire.Identity:
    """The identity of the test client (hostile tests: what their client signs with, if at all)."""
    return sigwire.Identity.generate()


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every Ed25519 verification the signing module performs, by the bytes verified."""
    seen: list[bytes] = []
    real = signing._verifies

    def counting(key: Any, value: bytes, data: bytes) -> bool:
        seen.append(data)
        return real(key, value, data)

    monkeypatch.setattr(signing, "_verifies", counting)
    return seen
