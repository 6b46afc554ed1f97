"""``python -m procd``: the same as the ``procd`` command."""

from procd.cli import entry

entry()
