"""The control socket: one Unix stream socket per running pipeline, line-delimited JSON, and the
one table of the commands it takes.

``COMMANDS`` declares every command once, with its typed fields: the server parses a request
against it (``parse``), the supervisor answers through one handler per command (``dispatch``
refuses a handler table that does not match it), and the CLI builds its client verbs from it and
sends requests through ``call``, which checks the fields against the same table. Adding a verb
means a ``Command`` here, a handler in the supervisor and its client side in the CLI.

Server side (used by the supervisor's loop, non-blocking): a request is one JSON object on one
line, ``{"command": "status"}``, at most ``MAX_REQUEST`` bytes; each gets one reply line,
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. A malformed, oversized or unknown
request gets an error reply and never disturbs the daemon. A client is served only while it reads
its replies (``connections``).

Where the socket is (``default_directory``, the rule the README states): ``$RUNTIME_DIRECTORY``
(systemd's ``RuntimeDirectory=``), else ``/run/procd`` for root, ``$XDG_RUNTIME_DIR/procd`` for a
user who has it, else ``/tmp/procd-UID``. The directory is made 0700 and checked with ``lstat``
after making it: it must be a real directory of ours with no access for others, or procd refuses
to start (another local user could otherwise have made it first and answer in our name).

Both ends check the other's credentials (``SO_PEERCRED``): the server serves only its own uid and
root; a client believes only a server of its own uid, root, or (for root) the owner of the
directory the socket is in (a service's own user).
"""

from __future__ import annotations

import array
import json
import math
import os
import socket
import stat
import struct
from collections.abc import Callable, Mapping

from procd.errors import ProcdError
from procd.frozen import frozen_dataclass
from procd.ops.connections import Connection, Listener

TYPE_CHECKING = False  # mypy reads the name; ``typing`` is 3 ms more of every ``procd status`` at run time
if TYPE_CHECKING:
    from typing import Any

MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 32
CLIENT_IDLE_S = 30.0
CLIENT_STALL_S = 5.0  # replies waiting, none read: the client is dropped
OUTBOX_LIMIT = 256 * 1024
_CRED = struct.Struct("3i")
# longer than the longest pipeline.reload_timeout (config.RELOAD_TIMEOUT_RANGE_S), with room for
# applying the reload after the check
RELOAD_REPLY_S = 3600.0 + 60.0


class ControlError(ProcdError):
    """The control socket cannot be made, or a client cannot reach a pipeline."""


# -- the command table -----------------------------------------------------------------------------


@frozen_dataclass(frozen=True)  # its methods need not be compiled at each start
class Field:
    """One field of a request: its name and JSON type (``int`` excludes ``bool``)."""

    name: str
    kind: type[int] | type[str]

    def accepts(self, value: object) -> bool:
        return isinstance(value, self.kind) and not isinstance(value, bool)

    @property
    def kind_name(self) -> str:
        return "an integer" if self.kind is int else "a string"


@frozen_dataclass(frozen=True)  # its methods need not be compiled at each start
class Command:
    """One control command: what it does and what it takes."""

    name: str
    summary: str
    fields: tuple[Field, ...] = ()
    verb: bool = True  # a ``procd NAME`` command of its own (else used by another verb)
    reply_timeout_s: float = 10.0  # how long the client waits for the reply


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("status", "every stage and worker of a running pipeline"),
        Command("stop", "stop a running pipeline (the same as SIGTERM)"),
        # answered once the new file's stage code is checked: within pipeline.reload_timeout
        Command("reload", "re-read a running pipeline's file (the same as SIGHUP)", reply_timeout_s=RELOAD_REPLY_S),
        Command(
            "scale",
            "change the number of processes of a stage: STAGE=N",
            (Field("stage", str), Field("processes", int)),
        ),
        Command("attach", "the writing end of a stage's input (procd dlq replay)", (Field("stage", str),), verb=False),
        Command(
            "replayed",
            "a replay into a stage has ended (procd dlq replay)",
            (Field("stage", str), Field("items", int), Field("file", str)),
            verb=False,
        ),
    )
}


@frozen_dataclass(frozen=True)  # its methods need not be compiled at each start
class Request:
    """A request that matches the table: ``args`` holds every field, of its declared type."""

    command: Command
    args: dict[str, Any]


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


if TYPE_CHECKING:  # types for annotations only (see the import of ``Any``)
    Reply = dict[str, Any] | tuple[dict[str, Any], tuple[int, ...]]  # a reply, and descriptors to pass
    Answer = Reply | Deferred
    Handler = Callable[[Request], Answer]


def _check_fields(command: Command, args: Mapping[str, object]) -> str | None:
    """What is wrong with ``args`` for ``command``, or None."""
    declared = {f.name for f in command.fields}
    takes = ", ".join(f'"{f.name}" ({f.kind_name})' for f in command.fields) or "no fields"
    for name in args:
        if name not in declared:
            return f'unknown field "{name}" for {command.name}; it takes {takes}'
    for field in command.fields:
        if field.name not in args:
            return f'{command.name} needs "{field.name}" ({field.kind_name})'
        if not field.accepts(args[field.name]):
            return f'{command.name}: "{field.name}" must be {field.kind_name}, got {args[field.name]!r}'
    return None


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
    problem = _check_fields(command, message)
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


# -- where the socket is ---------------------------------------------------------------------------


def default_directory() -> str:
    """``$RUNTIME_DIRECTORY`` under systemd, ``/run/procd`` for root, ``$XDG_RUNTIME_DIR/procd``
    for a user who has it, else ``/tmp/procd-UID``."""
    service = os.environ.get("RUNTIME_DIRECTORY")
    if service:
        return service.split(":")[0]
    if os.geteuid() == 0:
        return "/run/procd"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "procd") if runtime else f"/tmp/procd-{os.geteuid()}"


def default_path(pipeline: str) -> str:
    return os.path.join(default_directory(), f"{pipeline}.sock")


def search_directories() -> list[str]:
    """Every directory where a pipeline that this user may talk to can have its socket, the
    default first: also ``/run/procd`` (a system service's), and for a user both
    ``$XDG_RUNTIME_DIR/procd`` and ``/tmp/procd-UID`` (a pipeline started with or without it)."""
    found = [default_directory(), "/run/procd"]
    if os.geteuid() != 0:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime:
            found.append(os.path.join(runtime, "procd"))
        found.append(f"/tmp/procd-{os.geteuid()}")
    return list(dict.fromkeys(found))


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
                if _answers(path):
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
        pid, uid, _gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
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


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


# -- the client side -------------------------------------------------------------------------------


def find_socket(pipeline: str | None, explicit: str | None) -> str:
    """The control socket to talk to: ``explicit``, else the pipeline's in the first of
    ``search_directories`` that has one, else the only pipeline running in any of them.

    Raises:
        ControlError: none is found (the message says where procd looked), or several run.
    """
    if explicit:
        return explicit
    directories = search_directories()
    looked = ", ".join(directories)
    if pipeline:
        candidates = [os.path.join(d, f"{pipeline}.sock") for d in directories]
        existing = [p for p in candidates if os.path.lexists(p)]
        if not existing:
            raise ControlError(f"no pipeline named {pipeline} is running (looked for {pipeline}.sock in {looked})")
        return next((p for p in existing if _answers(p)), existing[0])
    running: dict[str, str] = {}
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(".sock") and name[: -len(".sock")] not in running and _answers(path):
                running[name[: -len(".sock")]] = path
    if not running:
        raise ControlError(f"no running pipeline found (looked in {looked})")
    if len(running) > 1:
        raise ControlError(f"several pipelines are running ({', '.join(sorted(running))}); name one")
    return next(iter(running.values()))


def _check_server(sock: socket.socket, path: str) -> None:
    """Believe only a server of our uid, root, or (for root) the owner of the socket's directory.

    Raises:
        ControlError: another user answers on ``path``.
    """
    pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    me = os.geteuid()
    if uid in (me, 0):
        return
    if me == 0:
        try:
            if os.stat(os.path.dirname(os.path.abspath(path))).st_uid == uid:
                return
        except OSError:
            pass
    raise ControlError(
        f"refusing {path}: the process answering there (pid {pid}) runs as uid {uid}, not as uid {me} or root; "
        "another user may have taken the place of the pipeline's control socket"
    )


def encode(name: str, **args: Any) -> bytes:
    """One request line for ``name``, its fields checked against the table.

    Raises:
        ControlError: no such command, or fields that do not match it.
    """
    command = COMMANDS.get(name)
    if command is None:
        raise ControlError(f'unknown command "{name}"; commands are {", ".join(COMMANDS)}')
    problem = _check_fields(command, args)
    if problem is not None:
        raise ControlError(problem)
    return json.dumps({"command": name, **args}).encode() + b"\n"


def call(path: str, name: str, timeout_s: float | None = None, **args: Any) -> dict[str, Any]:
    """Send one request and return the reply.

    Raises:
        ControlError: nothing answers at ``path``, another user does, or the reply is not JSON.
    """
    reply, _fds = call_fds(path, name, timeout_s, **args)
    return reply


def call_fds(path: str, name: str, timeout_s: float | None = None, **args: Any) -> tuple[dict[str, Any], list[int]]:
    """``call``, also returning the descriptors the reply carried (``attach``). The reply is
    awaited for ``timeout_s``, by default the command's ``reply_timeout_s``."""
    line = encode(name, **args)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s if timeout_s is not None else COMMANDS[name].reply_timeout_s)
    data = b""
    fds: list[int] = []
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no pipeline is running with the control socket {path}") from None
        except PermissionError:
            raise ControlError(f"permission denied: {path} belongs to another user") from None
        _check_server(sock, path)
        sock.sendall(line)
        while not data.endswith(b"\n"):
            chunk, ancdata, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    fds.extend(received)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ControlError(f"talking to {path} failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise ControlError(f"the reply from {path} is not JSON: {data[:200]!r}") from None
    return reply, fds
