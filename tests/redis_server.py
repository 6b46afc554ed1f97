"""A real redis-server for the tests: started on a unix socket in the test's own directory (never
a fixed port), with the options a test asks for, and shut down with the test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from conftest import wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """One redis-server process; ``restart`` brings it back on the same socket and data."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> RedisServer:
        if not os.path.exists(REDIS_SERVER):
            raise RuntimeError("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--dir", str(self.directory), "--save", "", *self.options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, timeout=10)
        assert self.proc.poll() is None, "redis-server did not start"
        return self

    def kill(self) -> None:
        """SIGKILL: what a crash of the server looks like to its clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.socket.exists():
            self.socket.unlink()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
