"""``python -m procd`` and the ``procd`` command: hold the stop signals from the first line, then
run the command line.

A SIGTERM that arrived while procd was still importing used to end it by the signal's default
action, an exit status outside procd's documented codes. From here on it is held (blocked) instead:
``procd run`` hands it to its supervisor's loop once that loop can take it (``signals.open_wakeup``
unblocks), and every other command releases it at once (``cli.main``). Only the interpreter's own
start-up, before this line, remains uncovered.
"""

# ``_signal`` is the C module under ``signal``: built in, so importing it costs nothing, where
# ``signal`` would first import ``enum`` (about 7 ms). Numbers as ``signals.HELD`` lists them.
import _signal  # type: ignore[import-not-found]

_signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGUSR1})

from procd.cli import entry  # noqa: E402  (after the mask, on purpose)

if __name__ == "__main__":
    entry()
