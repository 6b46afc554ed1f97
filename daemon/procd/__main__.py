"""``python -m procd``: the same as the ``procd`` command."""

import sys

from procd.cli import main

sys.exit(main())
