"""procinfo.waits_on, which decides when a command stage's program has finished with its input:
real processes in each state it must tell apart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import wait_until
from procd import procinfo


def _reader() -> tuple[subprocess.Popen[bytes], int]:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", "import os; os.read(0, 1); os.read(0, 1)"], stdin=read_fd)
    os.close(read_fd)
    return proc, write_fd


def test_a_program_asleep_reading_its_stdin_waits() -> None:
    proc, write_fd = _reader()
    try:
        assert wait_until(lambda: procinfo.waits_on(proc.pid, 0), timeout=10)
        assert procinfo.waits_on(proc.pid, 5) is False  # another descriptor
    finally:
        os.close(write_fd)
        proc.wait(timeout=10)


def test_a_stopped_or_dead_program_does_not_wait() -> None:
    """A zombie (killed, not yet reaped) still shows its last state in /proc: it must not count
    as waiting for input, or its unfinished batch would be taken as handed on."""
    proc, write_fd = _reader()
    try:
        wait_until(lambda: procinfo.waits_on(proc.pid, 0), timeout=10)
        proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: procinfo._state(proc.pid) == "T", timeout=10)
        assert procinfo.waits_on(proc.pid, 0) is False
        proc.send_signal(signal.SIGKILL)
        wait_until(lambda: procinfo._state(proc.pid) == "Z", timeout=10)
        assert procinfo.waits_on(proc.pid, 0) is False
    finally:
        os.close(write_fd)
        proc.wait(timeout=10)
    assert procinfo.waits_on(proc.pid, 0) is False  # gone


def test_a_busy_program_does_not_wait() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.PIPE)
    try:
        for _ in range(50):
            assert procinfo.waits_on(proc.pid, 0) is False
    finally:
        proc.kill()
        proc.wait(timeout=10)
