"""The control socket's server side: one Unix stream socket per running pipeline, line-delimited
JSON, served by the supervisor's loop (non-blocking). The commands it takes, where the socket is
and the client are ``commands``'.

A request is one JSON object on one line, ``{"command": "status"}``, at most ``MAX_REQUEST``
bytes, checked against ``commands.COMMANDS`` (``parse``); each gets one reply line, ``{"ok": true,
...}`` or ``{"ok": false, "error": "..."}``, from one handler per command (``dispatch``;
``check_handlers`` refuses a handler table that does not match the commands). A malformed,
oversized or unknown request gets an error reply and never disturbs the daemon. A client is served
only while it reads its replies (``connections``).

The directory the socket is in is made 0700 and checked with ``lstat`` after making it: it must be
a real directory of ours with no access for others, or procd refuses to start (another local user
could otherwise have made it first and answer in our name). The server serves only its own uid
and root (``SO_PEERCRED``).
"""

from __future__ import annotations

import array
import json
import math
import os
import socket
import stat
from collections.abc import Callable, Mapping
from typing import Any

from procd.frozen import frozen_dataclass
from procd.ops.commands import COMMANDS, PEER_CRED, Command, ControlError, answers, check_fields, search_directories
from procd.ops.connections import Connection, Listener

MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 32
CLIENT_IDLE_S = 30.0
CLIENT_STALL_S = 5.0  # replies waiting, none read: the client is dropped
OUTBOX_LIMIT = 256 * 1024


# -- requests and replies --------------------------------------------------------------------------


@frozen_dataclass(frozen=True)  # its methods need not be compiled at each start
class Request:
    """A request that matches the table: ``args`` holds every field, of its declared type."""

    command: Command
    args: dict[str, Any]


Reply = dict[str, Any] | tuple[dict[str, Any], tuple[int, ...]]  # a reply, and descriptors to pass


class Deferred:
    """A reply that comes later (``reload`` answers once its check has ended): the handler keeps
    it and calls ``resolve``; the server calls back whoever waits on it. Meanwhile the client's
    later requests wait (replies keep their order) and the server goes on serving everyone else."""

    def __init__(self) -> None:
        self._waiters: list[Callable[[Reply], None]] = []
        self.resolved = False

    def then(self, callback: Callable[[Reply], None]) -> None:
        """Call ``callback(reply)`` when the reply is known."""
        self._waiters.append(callback)

    def resolve(self, reply: Reply) -> None:
        """The reply is known: hand it to every waiter, once."""
        if self.resolved:
            return
        self.resolved = True
        waiters, self._waiters = self._waiters, []
        for callback in waiters:
            callback(reply)

    def __repr__(self) -> str:
        return f"<Deferred {'resolved' if self.resolved else 'pending'}, {len(self._waiters)} waiting>"


Answer = Reply | Deferred
Handler = Callable[[Request], Answer]


def parse(line: bytes) -> Request | str:
    """A request line, checked against the table; an error message for anything else."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays ("[[[[...")
        return "malformed request: expected one JSON object per line"
    if not isinstance(message, dict) or not isinstance(message.get("command"), str):
        return 'malformed request: expected {"command": "..."}'
    name = message.pop("command")
    command = COMMANDS.get(name)
    if command is None:
        return f'unknown command "{name[:100]}"; commands are {", ".join(COMMANDS)}'
    problem = check_fields(command, message)
    return problem if problem is not None else Request(command, message)


def check_handlers(handlers: Mapping[str, Handler]) -> None:
    """Raise ``ValueError`` unless there is exactly one handler per command of the table."""
    if set(handlers) != set(COMMANDS):
        missing, extra = sorted(set(COMMANDS) - set(handlers)), sorted(set(handlers) - set(COMMANDS))
        raise ValueError(f"control handlers do not match the command table: missing {missing}, extra {extra}")


def dispatch(request: Request | str, handlers: Mapping[str, Handler]) -> Answer:
    """The answer to one parsed request: an error reply for a bad one, else its handler's."""
    if isinstance(request, str):
        return {"ok": False, "error": request}
    return handlers[request.command.name](request)


# -- the socket's directory ------------------------------------------------------------------------


def _secure_directory(directory: str, *, chosen: bool) -> None:
    """Make ``directory`` (0700) unless it exists, then check it with ``lstat``.

    A chosen directory (``--control``) may also belong to root and grant others read access; a
    default one must be ours alone.

    Raises:
        ControlError: it is not a directory of ours that others cannot change.
    """
    try:
        os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(f"cannot create the control directory {directory}: {exc.strerror}") from None
    info = os.lstat(directory)
    owners = {os.geteuid(), 0} if chosen else {os.geteuid()}
    forbidden = 0o022 if chosen else 0o077
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory"
    elif info.st_uid not in owners:
        problem = f"belongs to uid {info.st_uid}, not to uid {os.geteuid()}"
    elif info.st_mode & forbidden:
        needed = "no write access for others" if chosen else "0700, no access for others"
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o} (it must have {needed})"
    if problem is not None:
        raise ControlError(
            f"refusing the control directory {directory}: it {problem}; another user may have made it. "
            "Remove it, or choose another place with --control."
        )


# -- the server side -------------------------------------------------------------------------------


class Client(Connection):
    """One accepted connection: request lines in, reply lines out."""

    def __init__(self, sock: socket.socket, now: float, peer_pid: int, peer_uid: int) -> None:
        super().__init__(sock, now, idle_s=CLIENT_IDLE_S, stall_s=CLIENT_STALL_S, outbox_limit=OUTBOX_LIMIT)
        self.peer_pid = peer_pid
        self.peer_uid = peer_uid
        self.pending: Deferred | None = None  # a reply still to come; later requests wait for it

    @property
    def deadline(self) -> float:
        """No idle deadline while procd owes the client a reply (the reply's own deadline applies)."""
        return math.inf if self.pending is not None else super().deadline

    def next_request(self) -> Request | str | None:
        """The next complete request in the inbox (an error message for a bad one), or None."""
        while True:
            end = self.inbox.find(b"\n")
            if end < 0:
                if len(self.inbox) > MAX_REQUEST:
                    self.inbox.clear()
                    self.closing = True
                    return f"request longer than {MAX_REQUEST} bytes"
                return None
            line = bytes(self.inbox[:end])
            del self.inbox[: end + 1]
            if len(line) > MAX_REQUEST:
                self.closing = True
                return f"request longer than {MAX_REQUEST} bytes"
            if line.strip():
                return parse(line)

    def reply(self, answer: Reply) -> None:
        """Queue a reply; one that carries descriptors (``SCM_RIGHTS``) is sent at once, after
        whatever is queued before it."""
        message, fds = answer if isinstance(answer, tuple) else (answer, ())
        data = json.dumps(message, default=str).encode() + b"\n"
        if not fds:
            self.send(data)
            return
        if not self.flush(self.active_at):
            self.send(json.dumps({"ok": False, "error": "read your earlier replies first"}).encode() + b"\n")
            return
        try:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        except OSError:
            self.closing = True


class ControlServer(Listener):
    """The listening socket of one pipeline."""

    def __init__(self, path: str) -> None:
        """Make the directory safely, then bind the socket (0600). A directory of the location
        rule (``search_directories``) must be ours alone; one chosen with ``--control`` may also
        be root's and readable by others.

        Raises:
            ControlError: the directory is not safe, another procd answers on ``path``, or the
                socket cannot be made.
        """
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        _secure_directory(directory, chosen=directory not in search_directories())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.lexists(path):
                if answers(path):
                    raise ControlError(f"another procd is already running with the control socket {path}")
                os.unlink(path)  # left behind by a procd that was killed
            previous = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(previous)
            os.chmod(path, 0o600)
            sock.listen(16)
        except (OSError, ControlError) as exc:
            sock.close()
            if isinstance(exc, ControlError):
                raise
            raise ControlError(f"cannot create the control socket {path}: {exc.strerror}") from None
        super().__init__(sock, max_connections=MAX_CLIENTS)

    def accept(self, now: float) -> tuple[Client | None, dict[str, int] | None]:
        """Accept one connection: (client, None), or (None, peer) for a refused peer, or
        (None, None) when there was nothing to accept (or the listener paused)."""
        conn = self.take(now)
        if conn is None:
            return None, None
        pid, uid, _gid = PEER_CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CRED.size))
        if uid not in (0, os.geteuid()):
            try:
                conn.setblocking(False)
                conn.send(b'{"ok": false, "error": "permission denied: not the same user"}\n')
            except OSError:
                pass
            conn.close()
            self.release()
            return None, {"pid": pid, "uid": uid}
        return Client(conn, now, pid, uid), None

    def close(self) -> None:
        super().close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
