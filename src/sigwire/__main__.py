"""``python -m sigwire``: the command line."""

import sys

from sigwire.cli import main

sys.exit(main())
