"""A reload's check of the new pipeline file's stage code, in a child process that the
supervisor's loop watches.

Discussion. Checking stage code imports it, and an import takes as long as the user's module
wants (for ever, if it waits on something); building a pipeline's environment takes longer still.
The supervisor must keep serving meanwhile (control requests, SIGCHLD, the watchdog), so the check
runs in a child that the loop watches like any other source: its result arrives on a pipe, its
exit through the one reaper (SIGCHLD), and its deadline is one of the loop's. The alternative,
waiting in the loop with a deadline of one watchdog interval, either starves the watchdog or
fails a slow but healthy import.

The child is forked with every signal blocked and resets the supervisor's handlers and wake-up fd
before it unblocks them (a signal to the child is not the supervisor's). It closes every
descriptor but its pipe: a queue's writing end held by the check, or by a process that the stage
code starts at import, would keep that queue's readers from ever seeing its end. It leads its own
process group, so a deadline kills it with every process it started.

The supervisor reads the file itself (``config.read_pipeline``, no user code); the child inherits
that spec and sends back only JSON: each stage's ``StageCode``, and for a pipeline with an
environment which one it prepared, or why it could not be built. The supervisor never unpickles.
The child's claim on a prepared environment ends with it; the supervisor claims it again when it
applies the reload (``environment.prepare`` finds it complete and only takes its lock).
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from procd import callables, procctl, signals
from procd.config import PipelineSpec
from procd.errors import Problem
from procd.launch import environment

_READ_SIZE = 1 << 16


@dataclass(frozen=True)
class Prepared:
    """The environment the check prepared for the new file."""

    path: str
    key: str
    built: bool
    seconds: float
    projects: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """What the check found: the new spec completed with its stage code, every problem, and
    (for a pipeline with an environment) the environment prepared or the build that failed."""

    spec: PipelineSpec
    problems: list[Problem]
    prepared: Prepared | None = None
    build_error: environment.BuildError | None = None


@dataclass
class Check:
    """A running check: the child's pid, the pipe its result arrives on, and the spec it checks."""

    pid: int
    fd: int
    spec: PipelineSpec
    problems: list[Problem]
    data: bytearray = field(default_factory=bytearray)

    def read(self) -> bool:
        """Take what the child has written so far; False once the pipe has ended (or the
        descriptor is closed)."""
        while True:
            try:
                chunk = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            self.data += chunk

    def kill(self) -> set[int]:
        """SIGKILL the child and every process it started (its process group); return their
        pids (the supervisor reaps those that are re-parented to it, and knows them)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return {self.pid}
        return {self.pid} | _group(self.pid)

    def close(self) -> None:
        os.close(self.fd)

    def outcome(self, ended: str) -> Outcome:
        """What the child reported, once it has exited (``ended``: how, for a message)."""
        self.read()
        try:
            result: dict[str, Any] = json.loads(self.data)
            codes = {name: callables._from_json(found) for name, found in result.get("codes", {}).items()}
            failed = result.get("build_error")
            prepared = result.get("prepared")
        except (ValueError, TypeError, KeyError, AttributeError):
            problem = Problem("", f"the check of the stage code ended ({ended}) without a result")
            return Outcome(self.spec, [*self.problems, problem])
        if failed is not None:
            error = environment.BuildError(failed["project"], failed["what"], failed["tail"])
            return Outcome(self.spec, self.problems, build_error=error)
        spec, problems = callables.complete(self.spec, codes, list(self.problems))
        if prepared is not None:
            return Outcome(spec, problems, Prepared(**{**prepared, "projects": tuple(prepared["projects"])}))
        return Outcome(spec, problems)


def start(spec: PipelineSpec, problems: list[Problem], title: str, timeout_s: float) -> Check:
    """Fork the child that checks ``spec`` (already read, with the ``problems`` found reading it).

    ``timeout_s`` only bounds the child's own waits; the caller's deadline is what ends a check.

    Raises:
        OSError: the pipe or the fork failed.
    """
    read_fd, write_fd = os.pipe()
    supervisor = os.getpid()
    try:
        pid, mask = procctl.fork_blocked()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:
        try:
            signals.reset_in_child()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.setpgid(0, 0)
            procctl.die_with_parent(signal.SIGKILL, supervisor)  # no orphan if procd is killed
            procctl.close_all_but({0, 1, 2, write_fd})
            procctl.set_title(title)
            _report(spec, timeout_s, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    return Check(pid, read_fd, spec, list(problems))


def _report(spec: PipelineSpec, timeout_s: float, fd: int) -> None:
    """In the child: check, and write what was found as one JSON document."""
    result: dict[str, Any] = {}
    if not spec.has_environment:
        codes = callables.check_callables_apart(spec, timeout_s)
    else:
        try:
            env = environment.prepare(spec)
        except environment.BuildError as error:
            codes = {}
            result["build_error"] = {"project": error.project, "what": error.what, "tail": error.tail}
        else:
            try:
                codes = environment.check_stage_code(spec, env, reuse=True, timeout_s=timeout_s)
            finally:
                env.release()
            result["prepared"] = {
                "path": env.path,
                "key": env.key,
                "built": env.built,
                "seconds": env.seconds,
                "projects": [b.project for b in env.projects],
            }
    result["codes"] = {name: callables._as_json(code) for name, code in codes.items()}
    data = memoryview(json.dumps(result).encode())
    while data:
        data = data[os.write(fd, data) :]


def _group(pgid: int) -> set[int]:
    """The pids of process group ``pgid`` (from /proc; a killed member stays listed until reaped)."""
    members = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            members.add(int(entry))
    return members
