"""The control socket: one Unix stream socket per running pipeline, line-delimited JSON.

Server side (used by the supervisor's loop, non-blocking): a request is one JSON object on one
line, ``{"command": "status"}``, at most ``MAX_REQUEST`` bytes; each gets one reply line,
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. A malformed, oversized or unknown
request gets an error reply and never disturbs the daemon. The socket is mode 0600 inside a
0700 directory, and the peer's credentials (``SO_PEERCRED``) must be our uid or root.

Client side (used by ``procd status``, ``stop``, ``scale``, ``reload``): one blocking request.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from typing import Any

from procd.errors import ProcdError

MAX_REQUEST = 64 * 1024
COMMANDS = ("status", "stop", "reload", "scale", "attach", "replayed")
_CRED = struct.Struct("3i")


class ControlError(ProcdError):
    """The control socket cannot be made, or a client cannot reach a pipeline."""


def default_directory() -> str:
    """``$XDG_RUNTIME_DIR/procd`` for a user, ``/run/procd`` for root, else ``/tmp/procd-UID``."""
    if os.geteuid() == 0:
        return "/run/procd"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "procd") if runtime else f"/tmp/procd-{os.geteuid()}"


def default_path(pipeline: str) -> str:
    return os.path.join(default_directory(), f"{pipeline}.sock")


class Client:
    """One accepted connection: bytes in, requests out; replies queued until writable."""

    def __init__(self, sock: socket.socket, peer_pid: int, peer_uid: int) -> None:
        self.sock = sock
        self.peer_pid = peer_pid
        self.peer_uid = peer_uid
        self.inbox = b""
        self.outbox = b""
        self.closing = False  # close once the outbox is sent

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_requests(self) -> list[dict[str, Any] | str] | None:
        """Return the complete requests received (a dict, or an error message for a bad one);
        None when the peer has closed."""
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not chunk:
            return None
        self.inbox += chunk
        *lines, self.inbox = self.inbox.split(b"\n")
        requests: list[dict[str, Any] | str] = [_parse(line) for line in lines if line.strip()]
        if len(self.inbox) > MAX_REQUEST:
            requests.append(f"request longer than {MAX_REQUEST} bytes")
            self.inbox = b""
            self.closing = True
        return requests

    def reply(self, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        """Queue a reply; one that carries descriptors (``SCM_RIGHTS``) is sent at once."""
        data = json.dumps(message, default=str).encode() + b"\n"
        if not fds:
            self.outbox += data
            return
        self.flush()
        try:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        except OSError:
            self.closing = True

    def flush(self) -> bool:
        """Send what the socket takes now; True when nothing is left to send."""
        while self.outbox:
            try:
                sent = self.sock.send(self.outbox)
            except BlockingIOError:
                return False
            except OSError:
                self.outbox = b""
                self.closing = True
                return True
            self.outbox = self.outbox[sent:]
        return True

    def close(self) -> None:
        self.sock.close()


def _parse(line: bytes) -> dict[str, Any] | str:
    try:
        request = json.loads(line)
    except ValueError:
        return "malformed request: expected one JSON object per line"
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return 'malformed request: expected {"command": "..."}'
    if request["command"] not in COMMANDS:
        return f'unknown command "{request["command"]}"; commands are {", ".join(COMMANDS)}'
    return request


class ControlServer:
    """The listening socket of one pipeline."""

    def __init__(self, path: str) -> None:
        """Create the directory (0700) if needed and bind the socket (0600).

        Raises:
            ControlError: another procd answers on ``path``, or it cannot be created.
        """
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700)
            if os.path.exists(path):
                if _answers(path):
                    raise ControlError(f"another procd is already running with the control socket {path}")
                os.unlink(path)  # left behind by a procd that was killed
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            previous = os.umask(0o177)
            try:
                self.sock.bind(path)
            finally:
                os.umask(previous)
            os.chmod(path, 0o600)
            self.sock.listen(16)
            self.sock.setblocking(False)
        except OSError as exc:
            raise ControlError(f"cannot create the control socket {path}: {exc.strerror}") from None

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[Client | None, dict[str, int] | None]:
        """Accept one connection: (client, None), or (None, peer) for a refused peer, or
        (None, None) when there was nothing to accept."""
        try:
            conn, _ = self.sock.accept()
        except OSError:  # nothing to accept, or no descriptor left for it (EMFILE): not fatal
            return None, None
        conn.setblocking(False)
        pid, uid, _gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        if uid not in (0, os.geteuid()):
            try:
                conn.send(b'{"ok": false, "error": "permission denied: not the same user"}\n')
            except OSError:
                pass
            conn.close()
            return None, {"pid": pid, "uid": uid}
        return Client(conn, pid, uid), None

    def close(self) -> None:
        self.sock.close()
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


def find_socket(pipeline: str | None, explicit: str | None) -> str:
    """The control socket to talk to.

    Raises:
        ControlError: none is given and the default directory has none, or several.
    """
    if explicit:
        return explicit
    if pipeline:
        return default_path(pipeline)
    directory = default_directory()
    try:
        names = sorted(
            n[: -len(".sock")]
            for n in os.listdir(directory)
            if n.endswith(".sock") and _answers(os.path.join(directory, n))  # not a stale one
        )
    except OSError:
        names = []
    if not names:
        raise ControlError(f"no running pipeline found in {directory}")
    if len(names) > 1:
        raise ControlError(f"several pipelines are running ({', '.join(names)}); name one")
    return default_path(names[0])


def request(path: str, message: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one request and return the reply.

    Raises:
        ControlError: nothing answers at ``path``, or the reply is not JSON.
    """
    reply, _fds = request_fds(path, message, timeout_s)
    return reply


def request_fds(path: str, message: dict[str, Any], timeout_s: float = 10.0) -> tuple[dict[str, Any], list[int]]:
    """``request``, also returning the descriptors the reply carried (``attach``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no pipeline is running with the control socket {path}") from None
        except PermissionError:
            raise ControlError(f"permission denied: {path} belongs to another user") from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        fds: list[int] = []
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
        raise ControlError(f"the reply from {path} is not JSON: {data[:200]!r}") from None
    return reply, fds
