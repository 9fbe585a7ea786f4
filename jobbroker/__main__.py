"""`python -m jobbroker`: the `jobbroker` command."""

import sys

from jobbroker.cli import main

sys.exit(main())
