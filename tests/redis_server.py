"""A real redis-server for the tests: started on a unix socket in the test's own directory (never
a fixed port), with the options a test asks for, and shut down with the test.

The server daemonizes (it is not a child of the test process, which the tests' no-child-left
check would otherwise count for a test that shares a module's server); its pid file says which
process to stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from conftest import wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/sbin/redis-server"


class RedisServer:
    """One redis-server process; ``restart`` brings it back on the same socket and data."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.pidfile = directory / "redis.pid"
        self.options = options

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text())
        except (OSError, ValueError):
            return None

    def start(self) -> RedisServer:
        if not os.path.exists(REDIS_SERVER):
            raise RuntimeError("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
        subprocess.run(
            [
                REDIS_SERVER,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
                "--logfile",
                str(self.directory / "redis.log"),
                *self.options,
            ],
            check=True,
            timeout=10,
        )
        wait_until(lambda: self.socket.exists() and self.pid is not None, timeout=10)
        return self

    def _end(self, signum: int) -> None:
        pid = self.pid
        if pid is None:
            return
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=10)
        self.pidfile.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: what a crash of the server looks like to its clients."""
        self._end(signal.SIGKILL)
        self.socket.unlink(missing_ok=True)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self._end(signal.SIGTERM)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
