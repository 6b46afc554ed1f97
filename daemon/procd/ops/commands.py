"""The control socket's commands and its client: the one table of the commands a running
pipeline takes, where each pipeline's socket is, and one request with its reply.

``COMMANDS`` declares every command once, with its typed fields: the server (``control``) parses a
request against it, the supervisor answers through one handler per command (``control.check_handlers``
refuses a handler table that does not match it), and the CLI builds its client verbs from it and
sends requests through ``call``, which checks the fields against the same table. Adding a verb
means a ``Command`` here, a handler in the supervisor and its client side in the CLI.

Where the socket is (``default_directory``, the rule the README states): ``$RUNTIME_DIRECTORY``
(systemd's ``RuntimeDirectory=``), else ``/run/procd`` for root, ``$XDG_RUNTIME_DIR/procd`` for a
user who has it, else ``/tmp/procd-UID``. A client believes only a server of its own uid, root,
or (for root) the owner of the directory the socket is in (a service's own user):
``SO_PEERCRED``.

Apart from the server (``control``) so that the client verbs (``procd status``, ``stop``,
``reload``, ``scale``) neither import nor compile it (these machines set
``PYTHONDONTWRITEBYTECODE=1``; bench/README.md, "Start-up"), and for the same reason written
against ``_socket``, the C module under ``socket``, whose calls are the same: ``socket`` builds
its enums at import, about 3 ms of every such command.
"""

from __future__ import annotations

import _socket
import array
import json
import os
import struct
from collections.abc import Mapping

from procd.errors import ProcdError
from procd.frozen import frozen_dataclass

TYPE_CHECKING = False  # mypy reads the name; ``typing`` is 3 ms more of every ``procd status`` at run time
if TYPE_CHECKING:
    from typing import Any

PEER_CRED = struct.Struct("3i")  # ``SO_PEERCRED``: pid, uid, gid
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


def check_fields(command: Command, args: Mapping[str, object]) -> str | None:
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


def answers(path: str) -> bool:
    """Whether a process accepts a connection on ``path`` now (within a second): a procd that runs,
    not a socket file a killed one left behind."""
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
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
        return next((p for p in existing if answers(p)), existing[0])
    running: dict[str, str] = {}
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(".sock") and name[: -len(".sock")] not in running and answers(path):
                running[name[: -len(".sock")]] = path
    if not running:
        raise ControlError(f"no running pipeline found (looked in {looked})")
    if len(running) > 1:
        raise ControlError(f"several pipelines are running ({', '.join(sorted(running))}); name one")
    return next(iter(running.values()))


def _check_server(sock: _socket.socket, path: str) -> None:
    """Believe only a server of our uid, root, or (for root) the owner of the socket's directory.

    Raises:
        ControlError: another user answers on ``path``.
    """
    pid, uid, _gid = PEER_CRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, PEER_CRED.size))
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
    problem = check_fields(command, args)
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
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
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
            chunk, ancdata, _flags, _addr = sock.recvmsg(65536, _socket.CMSG_SPACE(8 * 4), _socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
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
