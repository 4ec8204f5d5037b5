"""Run the ``intercom`` command line as ``python -m intercom``."""

import sys

from intercom.cli import main

sys.exit(main())
