"""Shared test settings.

TIMEOUT bounds every wait on a future or event; scale it on slow machines with
SIGWIRE_TEST_TIMEOUT_SCALE (e.g. 3). Tests never sleep to wait for state.
"""

from __future__ import annotations

import os

TIMEOUT_SCALE = float(os.environ.get("SIGWIRE_TEST_TIMEOUT_SCALE", "1"))
TIMEOUT = 10.0 * TIMEOUT_SCALE
