"""``python -m evomerge``: the ``evomerge`` command, for environments whose scripts are not on PATH."""

import sys

from evomerge.cli import main

sys.exit(main())
