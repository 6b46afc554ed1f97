"""The supervisor: the one process that runs a pipeline's loop and owns every worker slot.

Everything in this package runs in the supervisor process and nowhere else. It never imports stage
code and never unpickles an item (``tests/test_layers.py`` checks both): what it knows of a worker
comes from the worker's reports (``procd.reports``) and its slot file's header
(``procd.transport.slot``). ``core`` composes the parts; ``loop`` is the event loop they register
with; ``slots`` holds the supervisor's view of one worker slot. The parts, each owning one thing:
``driver`` (feeds a slot's events to ``lifecycle.step`` and carries out its actions), ``workerio``
(each worker's report and output pipes), ``groups`` (restart histories, finished stages, scale,
paced starts), ``wiring`` (each stage's input to its end of stream), ``reload`` (a request to an
applied plan), ``operations`` (control commands, metrics, sd_notify, status) and ``stopping`` (a
stop request to the exit code).
"""
