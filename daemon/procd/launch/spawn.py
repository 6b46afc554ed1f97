"""Starting a worker process: fork, and in the child everything up to the worker's own code.

The child can never return into the supervisor: its code runs inside ``try/finally: os._exit``.
Signals are blocked across ``fork`` so that no handler of the supervisor's runs in the child
before the child has reset them. Each worker leads its own process group (so one ``killpg``
reaches it and whatever it started) and asks the kernel for SIGKILL when the supervisor dies.

``start_method = "fork"`` runs the worker in the forked copy; ``"spawn"`` and ``"forkserver"``
exec a fresh ``sys.executable`` that rebuilds the worker from a pickled ``WorkerContext``. The
context reaches it in an inherited memfd whose number is the one argument: in ``argv`` itself a
large ``options`` table would exceed the kernel's limit of 128 KiB per argument (E2BIG).
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from procd import procctl, reports, signals
from procd.context import WorkerContext
from procd.launch.forkserver import ForkServer, context_memfd, read_context
from procd.worker import run
from procd.worker.reporter import EXEC_FAILED, Reporter


def _exec_fresh(ctx: WorkerContext, python: str | None) -> None:
    """Replace this child with a fresh interpreter that runs ``ctx``. Returns only on failure."""
    context_fd = context_memfd(ctx)
    os.set_inheritable(context_fd, True)
    code = "import sys, procd.launch.spawn as s; s.run_spawned(int(sys.argv[1]))"
    program = python or sys.executable
    os.execve(program, [program, "-c", code, str(context_fd)], _environ(python))


def _environ(python: str | None) -> dict[str, str]:
    """The environment of a fresh interpreter. procd's own (``python`` is None) is told where
    procd is; a pipeline environment's interpreter finds procd by itself (``environment.py``), and
    procd's directory on its path would show stage code every distribution procd's has."""
    env = dict(os.environ)
    if python is None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def run_spawned(context_fd: int) -> None:
    """Entry point of a spawned worker's fresh interpreter: ``context_fd`` holds its context."""
    ctx = read_context(context_fd)

    def body() -> int:
        procctl.set_title(ctx.title)
        return run(ctx)

    procctl.run_and_exit(body)


def start_forkserver(title: str, python: str | None = None) -> ForkServer:
    """Start the fork server (a fresh ``python``, by default ``sys.executable``), a child of this
    process.

    Raises:
        OSError: it could not be started.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor = os.getpid()
    pid, mask = procctl.fork_blocked()
    if pid == 0:
        try:
            signals.reset_in_child()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.setpgid(0, 0)
            fd = theirs.fileno()
            procctl.close_all_but({0, 1, 2, fd})
            os.set_inheritable(fd, True)
            code = "import sys, procd.launch.forkserver as f; f.serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])"
            program = python or sys.executable
            os.execve(program, [program, "-c", code, str(fd), str(supervisor), title], _environ(python))
        finally:
            os._exit(EXEC_FAILED)
    theirs.close()
    return ForkServer(pid, ours)


def fork_worker(
    ctx: WorkerContext,
    *,
    output_fd: int,
    keep: set[int],
    start_method: str,
    server: ForkServer | None = None,
    python: str | None = None,
) -> int:
    """Fork one worker and return its pid.

    Args:
        ctx: what the worker runs.
        output_fd: becomes the child's stdout and stderr (the supervisor logs each line).
        keep: descriptors the child keeps open (its queues and report pipe); all others close.
        start_method: ``fork``, ``spawn`` or ``forkserver`` (then ``server`` forks it).
        python: the interpreter ``spawn`` runs (the pipeline environment's); default procd's own.

    Raises:
        OSError: fork failed (EAGAIN, ENOMEM); no process exists.
    """
    if start_method == "forkserver" and server is not None:
        return server.launch(ctx, output_fd, keep)
    parent = os.getpid()
    pid, mask = procctl.fork_blocked()
    if pid == 0:

        def body() -> int:
            signals.reset_in_child()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.setpgid(0, 0)
            procctl.die_with_parent(signal.SIGKILL, parent)
            procctl.wire_worker_stdio(output_fd, keep)
            if start_method == "fork":
                procctl.set_title(ctx.title)
                return run(ctx)
            for fd in keep:
                os.set_inheritable(fd, True)
            try:
                _exec_fresh(ctx, python)
            except OSError as exc:
                program = python or sys.executable
                Reporter(ctx.report_fd).send(
                    reports.ExecFailed(errno=exc.errno or 0, error=exc.strerror or str(exc), program=program)
                )
            return EXEC_FAILED

        procctl.run_and_exit(body)
    try:
        os.setpgid(pid, pid)  # also here, so a killpg right after fork cannot miss the child
    except OSError:
        pass  # the child got there first, or has already exec'd or exited
    return pid
