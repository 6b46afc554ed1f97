"""procd: a declarative job-pipeline daemon for Linux.

A pipeline is a TOML file; each stage runs as a group of supervised processes joined to the next
by bounded queues. See README.md and DESIGN.md; the command line is ``procd.cli``.

Where things are. ``supervisor/`` runs in the supervisor process: ``core.Supervisor`` turns one
``loop.Loop`` and composes the parts that each own one thing (``driver``: the slot driver; ``workerio``: worker
pipes; ``groups``: restart
histories, scale, paced starts; ``wiring``: each stage's input and its end of stream; ``reload``;
``operations``: control commands, metrics, sd_notify, status; ``stopping``: stop requests and the
exit code). ``ops/`` holds the protocols operations serves, ``launch/`` starts workers, ``worker/``
runs in a worker after fork, ``transport/`` carries the items, ``cli/`` is the command line.

Adding a command (a ``procd VERB`` that asks a running pipeline something):

1. the command table: one ``Command`` in ``ops/commands.py``'s ``COMMANDS``, with its typed
   fields (the server checks a request against them; the client encodes from them);
2. the CLI: one ``_Verb`` in ``cli/__init__.py``'s ``_VERBS`` (its arguments, the request's fields
   made from them, what a reply prints), unless the command is used by another verb
   (``verb=False``);
3. one handler in ``supervisor/operations.py``'s ``Operations.handlers`` that answers the request,
   handing any change to the part that owns it. ``control.check_handlers`` refuses to start a
   supervisor whose handlers and table differ, and an unknown command gets an error reply.

Adding a transport (a new ``queue.backend``):

1. one module in ``transport/`` that subclasses the interface's ``Input``, ``Endpoint``,
   ``Writer`` and ``Reader`` (``transport/__init__.py`` says what each method means) and one line
   in its ``_BACKENDS``; its name in ``tests/test_transport.py``'s ``BACKENDS`` runs the
   conformance suite against it;
2. the config schema: its name in ``config.BACKENDS`` and its keys (if any) where the
   ``[stages.NAME.queue]`` table is read. Nothing else changes: the supervisor and the workers see
   only the interface.
"""

__version__ = "0.1.0"
