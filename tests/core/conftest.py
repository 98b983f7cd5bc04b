"""Fixtures shared by the core tests: fixed identities and a fixed timestamp."""

from __future__ import annotations

import pytest

from sigwire.signing import Identity

# A fixed timestamp keeps every value deterministic; replay tests pass now= explicitly.
T0 = 1_767_225_600_000


@pytest.fixture(scope="session")
def alice() -> Identity:
    """The identity of seed 00..1f, the vectors' ALICE."""
    return Identity.from_seed(bytes(range(32)))


@pytest.fixture(scope="session")
def bob() -> Identity:
    """The identity of seed 20..3f, the vectors' BOB."""
    return Identity.from_seed(bytes(range(32, 64)))


@pytest.fixture(scope="session")
def mallory() -> Identity:
    """A third identity that nobody trusts."""
    return Identity.from_seed(b"\x42" * 32)
