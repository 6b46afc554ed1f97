"""``start_method = "forkserver"``: workers forked from a small, fresh server process.

Discussion. A forked worker inherits everything the supervisor has (its imports, its memory);
a spawned one pays for a new interpreter and its imports every time. A fork server is a fresh
``sys.executable`` that has imported procd once and forks each worker on request. But a worker
must be the supervisor's own child, so that the one reaper collects it and ``PDEATHSIG`` ties it
to the supervisor. The server therefore double-forks: its short-lived middle child forks the
worker and exits at once, and the orphaned worker is re-parented by the kernel to the nearest
subreaper above it, which is the supervisor (``procctl.become_subreaper``). The worker waits for
that before it arms ``PDEATHSIG``.

Requests travel on a ``SOCK_SEQPACKET`` pair: the numbers the worker's descriptors must have,
and the descriptors themselves (``SCM_RIGHTS``), the first of which is a memfd holding the pickled
``WorkerContext`` (a stage's ``options`` can be larger than a socket message or an ``exec``
argument may be; ``spawn`` hands its fresh interpreter the same memfd). The reply is the worker's
pid. The worker puts each descriptor back at the number the supervisor gave it, so the context
needs no translation.

The supervisor's side is a blocking exchange, bounded by ``FORK_REPLY_TIMEOUT_S``: a server that
stops answering (stopped, wedged) is killed, the spawn fails, and the supervisor reports the
server's death as it reports any other (the pipeline stops: its workers cannot be started).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import signal
import socket
import struct
import time

from procd import procctl, reaper
from procd.context import WorkerContext
from procd.worker import run

_PID = struct.Struct("<i")
_MAX_FDS = 64
_REPARENT_TIMEOUT_S = 5.0
# How long the supervisor waits for the server to take a request and answer with a pid (a fork,
# in milliseconds even on a loaded machine). The supervisor's loop waits meanwhile: a server that
# overstays this is killed and the spawn fails, rather than the loop waiting for ever.
FORK_REPLY_TIMEOUT_S = 5.0


def serve(sock_fd: int, supervisor: int, title: str) -> None:
    """The server's main loop: one worker per request, until the supervisor closes the socket."""
    procctl.set_title(title)
    procctl.die_with_parent(signal.SIGKILL, supervisor)
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, _MAX_FDS)
        except ConnectionResetError:
            return
        if not message:
            return
        targets = pickle.loads(message)
        try:
            ctx = read_context(fds.pop(0))
            pid = _launch(ctx, fds, targets, supervisor)
        except OSError:
            pid = -1
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(_PID.pack(pid))


def _launch(ctx: WorkerContext, fds: list[int], targets: list[int], supervisor: int) -> int:
    read_fd, write_fd = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            worker = os.fork()
            if worker == 0:
                os.close(read_fd)
                os.close(write_fd)
                _become_worker(ctx, fds, targets, supervisor)
            os.write(write_fd, _PID.pack(worker))
        finally:
            os._exit(0)
    os.close(write_fd)
    data = os.read(read_fd, _PID.size)
    os.close(read_fd)
    reaper.wait_for(middle)
    return _PID.unpack(data)[0] if len(data) == _PID.size else -1


def _become_worker(ctx: WorkerContext, fds: list[int], targets: list[int], supervisor: int) -> None:
    """In the worker: wait to be the supervisor's child, put the descriptors in place, run."""

    def body() -> int:
        os.setpgid(0, 0)
        deadline = time.monotonic() + _REPARENT_TIMEOUT_S
        while os.getppid() != supervisor:  # the middle process is exiting right now
            if time.monotonic() > deadline:
                os._exit(1)
            time.sleep(0.0002)
        procctl.die_with_parent(signal.SIGKILL, supervisor)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1024) for fd in fds]
        output, *keep = targets
        for source, target in zip(high, targets, strict=True):
            os.dup2(source, target)
        procctl.wire_worker_stdio(output, set(keep))
        procctl.set_title(ctx.title)
        return run(ctx)

    procctl.run_and_exit(body)


def context_memfd(ctx: WorkerContext) -> int:
    """A new memfd (close-on-exec) holding the pickled ``ctx``, positioned at its start.

    Raises:
        OSError: the memfd could not be made or written.
    """
    data = memoryview(pickle.dumps(ctx))
    fd = os.memfd_create("procd-context", os.MFD_CLOEXEC)
    try:
        while data:
            data = data[os.write(fd, data) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def read_context(fd: int) -> WorkerContext:
    """Read a ``context_memfd`` to its end, close it, and return the context."""
    with open(fd, "rb") as fh:
        ctx: WorkerContext = pickle.loads(fh.read())
    return ctx


class ForkServer:
    """The supervisor's handle on its fork server."""

    def __init__(self, pid: int, sock: socket.socket, reply_timeout_s: float = FORK_REPLY_TIMEOUT_S) -> None:
        self.pid = pid
        self._sock = sock
        self.reply_timeout_s = reply_timeout_s

    def launch(self, ctx: WorkerContext, output_fd: int, keep: set[int]) -> int:
        """Have the server start one worker; return its pid (the supervisor's child).

        Raises:
            OSError: the server is gone, or could not fork.
        """
        targets = [output_fd, *sorted(keep)]
        context_fd = context_memfd(ctx)
        self._sock.settimeout(self.reply_timeout_s)
        try:
            socket.send_fds(self._sock, [pickle.dumps(targets)], [context_fd, *targets])
            reply = self._sock.recv(_PID.size)
        except TimeoutError:
            # a late reply would answer the next request with this one's pid: this server is done
            self.kill()
            raise OSError(
                errno.ETIMEDOUT,
                f"the fork server (pid {self.pid}) did not answer within {self.reply_timeout_s:g}s; it was killed",
            ) from None
        finally:
            os.close(context_fd)
        if len(reply) != _PID.size:
            raise OSError(0, "the fork server has gone")
        pid = int(_PID.unpack(reply)[0])
        if pid < 0:
            raise OSError(0, "the fork server could not fork")
        return pid

    def kill(self) -> None:
        """SIGKILL the server (the reaper collects it) and close its socket."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.close()

    def close(self) -> None:
        self._sock.close()
