"""procd: a declarative job-pipeline daemon for Linux.

A pipeline is a TOML file; each stage runs as a group of supervised processes joined to the next
by bounded queues. See README.md and DESIGN.md; the command line is ``procd.cli``.
"""

__version__ = "0.1.0"
