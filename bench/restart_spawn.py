"""Ways for a bridge to start its program, timed in one process the size of a bridge: what a
command stage's restart could gain from each, side by side, interleaved.

    .venv/bin/python bench/restart_spawn.py [--rounds 40]

This process imports what the supervisor imports and holds some heap (a bridge is a fork of the
supervisor), then starts ``sleep 3600`` ``--rounds`` times each way, round robin, and reports
milliseconds from the call to the program's exec being done (median, p90):

- ``fork, all signals``: what the bridge did before (64 ``signal.signal`` calls in the child);
- ``fork, ignored only``: what it does now (bridge.py ``_Start``: only SigIgn's signals reset);
- ``posix_spawn``: no Python in the child and no copy of the page tables (glibc uses
  ``CLONE_VM|CLONE_VFORK``), but no way to arm ``PR_SET_PDEATHSIG`` for the program;
- ``posix_spawn setpriv``: ``setpriv --pdeathsig KILL -- sleep`` (util-linux >= 2.33), a wrapper
  that arms it and execs the program (done = the program's exec, seen in /proc).

Kill-free: every program is SIGKILLed and reaped before the next start.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import statistics
import time
from collections.abc import Callable

from procfs import comm, load_text

import procd.cli
import procd.supervisor.core

_libc = ctypes.CDLL(None, use_errno=True)
_PROGRAM = ["sleep", "3600"]


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def _fork(all_signals: bool) -> tuple[int, float]:
    ignored = [s for s in signal.valid_signals() if signal.getsignal(s) == signal.SIG_IGN]
    path = shutil.which(_PROGRAM[0]) or _PROGRAM[0]
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            for signum in range(1, signal.NSIG) if all_signals else ignored:
                try:
                    signal.signal(signum, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
            os.closerange(3, err_w)
            os.closerange(err_w + 1, 4096)
            os.execv(path, _PROGRAM)
        finally:
            os._exit(127)
    os.close(err_w)
    os.read(err_r, 1)  # EOF: the exec is done
    os.close(err_r)
    return pid, time.perf_counter() - started


def _spawn(argv: list[str]) -> tuple[int, float]:
    started = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ, setsigdef=signal.valid_signals(), setsigmask=())
    if argv[0] != _PROGRAM[0]:
        while comm(pid) != _PROGRAM[0]:  # the wrapper's exec of the program
            pass
    return pid, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    ballast = [str(i) * 3 for i in range(50_000)]  # about a supervisor's size in all
    ways: dict[str, Callable[[], tuple[int, float]]] = {
        "fork, all signals": lambda: _fork(True),
        "fork, ignored only": lambda: _fork(False),
        "posix_spawn": lambda: _spawn(_PROGRAM),
    }
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        ways["posix_spawn setpriv"] = lambda: _spawn([setpriv, "--pdeathsig", "KILL", "--", *_PROGRAM])
    imported = f"{procd.cli.__name__}, {procd.supervisor.core.__name__}"
    print(f"{load_text()}; this process ({imported}, {len(ballast)} strings): VmRSS {_rss_kib() / 1024:.1f} MiB")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            pid, seconds = way()
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            times[name].append(seconds * 1000)
    for name, values in times.items():
        values.sort()
        p90 = values[int(len(values) * 0.9) - 1]
        print(f"  {name:22} median {statistics.median(values):6.2f} ms  p90 {p90:6.2f} ms")
    print(load_text())


if __name__ == "__main__":
    main()
