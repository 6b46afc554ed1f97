"""What runs inside a worker process, after ``fork`` (or in a fresh interpreter, for spawn).

Everything in this package runs on the worker's side of the process boundary, and nothing of the
supervisor's (``procd.supervisor``, ``procd.ops``, ``procd.launch``) is imported here.
``function``: a function stage's worker imports its code, then loops: receive a batch, call the
code per item, hand the results on (``outlet``) in batches to every downstream queue. ``bridge``:
a command stage's worker forks and execs the program, writes each input item to its stdin as a
JSON line, and turns each line of its stdout into an item. Either way the worker tells the
supervisor what happened through its report pipe (``reporter``). Queues are reached only through
``transport``; the batch in hand stays in the slot file until it has been handed on, for a command
stage too; a redelivered batch and the items given up on are ``redelivery``'s.

Descriptors: once the worker has its endpoints, every descriptor procd gave it is made
close-on-exec, so a program the stage code starts (``subprocess``, ``os.system``) never holds a
queue open. A child the stage code *forks* without exec inherits them: it must not outlive the
worker (procd names such a holder in an ``input_held_open`` record when a downstream input cannot
end).

The worker never returns into the supervisor's code: ``launch.spawn`` calls ``run`` inside
``try/finally: os._exit``.
"""

from __future__ import annotations

import os

from procd.context import WorkerContext
from procd.worker.bridge import run_command
from procd.worker.function import run_function
from procd.worker.reporter import Reporter


def run(ctx: WorkerContext) -> int:
    """Run one worker to its end; return its exit code."""
    _seal(ctx)
    reporter = Reporter(ctx.report_fd)
    if ctx.stage.command is not None:
        return run_command(ctx, reporter)
    return run_function(ctx, reporter)


def _seal(ctx: WorkerContext) -> None:
    """Keep procd's descriptors out of every program the worker or its stage code executes
    (``spawn`` made them inheritable to get them across its own exec)."""
    fds = {ctx.report_fd} | ({ctx.slot_fd} if ctx.slot_fd is not None else set())
    if ctx.input is not None:
        fds |= ctx.input.reader_fds()
    for output in ctx.outputs:
        fds |= output.endpoint.writer_fds()
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
