"""`python -m jobbroker`: the `jobbroker` command."""

import sys

from jobbroker.broker.cli import main

sys.exit(main())
