"""One supervised worker slot: its state, its current process, and how it is started.

A slot is a stage's ``[index]``; the process in it changes across restarts (``generation``). Its
state and flags are one ``lifecycle.Life``, which only the slot driver replaces, with what
``lifecycle.step`` returned; everything else here is bookkeeping of the current process.
``start`` makes the two pipes the supervisor reads (report records, and the worker's
stdout/stderr lines), forks through ``spawn``, and keeps only the supervisor's ends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from procd.config import StageSpec
from procd.context import Output, WorkerContext
from procd.launch.forkserver import ForkServer
from procd.launch.spawn import fork_worker
from procd.lifecycle import Life, State
from procd.transport import Endpoint, Input

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


@dataclass(eq=False)  # compared and hashed by identity: a reload may hold two slots named alike
class WorkerSlot:
    """The supervisor's record of one worker slot."""

    stage: StageSpec
    index: int
    life: Life = field(default_factory=Life)  # its state and flags: set only from what lifecycle.step returns
    pid: int | None = None
    generation: int = 0  # carried over from the slot a reload replaced, so the numbers go on
    spawned: int = 0  # processes this slot has started: only a second one is a restart
    started_at: float = 0.0
    report_fd: int | None = None
    output_fd: int | None = None
    report_buffer: bytes = b""
    output_buffer: bytes = b""
    restarts: int = 0
    input: Input | None = None  # what its current process reads and writes
    outputs: list[Input] = field(default_factory=list)
    slot_fd: int | None = None  # the slot file, shared with every generation (transport.slot)
    counts: dict[str, int] = field(default_factory=dict)  # the current process's, as last reported
    carried: dict[str, int] = field(default_factory=dict)  # the slot's earlier processes', summed

    # The life's parts, read-only: a flag changes only through ``lifecycle.step``.

    @property
    def state(self) -> State:
        """``running``, ``backoff``, ..."""
        return self.life.state

    @property
    def forced(self) -> bool:
        """Its process was sent SIGKILL at a stop's deadline."""
        return self.life.forced

    @property
    def retiring(self) -> bool:
        """Scaled away or replaced: it leaves the pipeline once it has no process."""
        return self.life.retiring

    @property
    def regrouping(self) -> bool:
        """Stopped for a rest_for_one restart: it starts again with its group."""
        return self.life.regrouping

    def total(self, key: str) -> int:
        """Items in or out over every process of the slot (a redelivered batch counts twice)."""
        return self.carried.get(key, 0) + self.counts.get(key, 0)

    def bind(self, log: FilteringBoundLogger) -> FilteringBoundLogger:
        """``log`` with the slot's stage, worker index, pid and generation bound."""
        return log.bind(stage=self.stage.name, worker=self.index, pid=self.pid, generation=self.generation)

    @property
    def name(self) -> str:
        """``transform[2]``."""
        return f"{self.stage.name}[{self.index}]"

    def __repr__(self) -> str:
        return f"<WorkerSlot {self.name} {self.state} pid={self.pid} generation={self.generation}>"


def start(
    slot: WorkerSlot,
    *,
    pipeline: str,
    base_dir: str,
    state_dir: str,
    start_method: str,
    input_endpoint: Endpoint | None,
    outputs: tuple[Output, ...],
    server: ForkServer | None = None,
    python: str | None = None,
) -> int:
    """Fork the slot's next process; return its pid and record the supervisor's pipe ends.

    ``python`` is the interpreter of a spawned worker (the pipeline environment's); default procd's.

    Raises:
        OSError: the pipes or the fork could not be made (nothing is left open then).
    """
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    output_r, output_w = os.pipe2(os.O_CLOEXEC)
    ctx = WorkerContext(
        pipeline=pipeline,
        base_dir=base_dir,
        stage=slot.stage,
        index=slot.index,
        generation=slot.generation + 1,
        report_fd=report_w,
        input=input_endpoint,
        outputs=outputs,
        slot_fd=slot.slot_fd,
        state_dir=state_dir,
    )
    keep = {report_w} | ({slot.slot_fd} if slot.slot_fd is not None else set())
    if input_endpoint is not None:
        keep |= input_endpoint.reader_fds()
    for output in outputs:
        keep |= output.endpoint.writer_fds()
    try:
        pid = fork_worker(ctx, output_fd=output_w, keep=keep, start_method=start_method, server=server, python=python)
    except OSError:
        for fd in (report_r, output_r):
            os.close(fd)
        raise
    finally:
        os.close(report_w)
        os.close(output_w)
    os.set_blocking(report_r, False)
    os.set_blocking(output_r, False)
    slot.pid = pid
    slot.generation += 1
    slot.spawned += 1
    for key, value in slot.counts.items():
        slot.carried[key] = slot.carried.get(key, 0) + value
    slot.counts = {}
    slot.report_fd, slot.output_fd = report_r, output_r
    slot.report_buffer = slot.output_buffer = b""
    return pid


TERMINAL = (State.EXITED, State.FATAL)


def ended(slot: WorkerSlot) -> bool:
    """No process, and none to come (a slot stopped for a group restart will start again)."""
    return slot.state in TERMINAL and not slot.regrouping
