"""Shared test settings.

TIMEOUT bounds every wait on a future or event; scale it on slow machines with
SIGWIRE_TEST_TIMEOUT_SCALE (e.g. 3). Tests never sleep to wait for state.
"""

from __future__ import annotations

import os

from hypothesis import settings

TIMEOUT_SCALE = float(os.environ.get("SIGWIRE_TEST_TIMEOUT_SCALE", "1"))
TIMEOUT = 10.0 * TIMEOUT_SCALE

# Property tests draw the same examples on every run: a failure found once is
# found again, and CI never turns red by chance. (SIGWIRE_HYPOTHESIS=explore
# draws fresh examples, to hunt for new failures locally.)
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("SIGWIRE_HYPOTHESIS", "ci"))
