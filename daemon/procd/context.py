"""What a worker is given: its stage, its input and outputs, its report pipe and slot file.

Shared by both sides of the process boundary: the supervisor's side (``supervisor.slots``,
``launch``) builds a ``WorkerContext``, and the worker (``worker``) runs from it. Plain data, so it
crosses ``exec`` (spawn) and the fork server's socket as a pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

from procd.config import StageSpec
from procd.transport import Endpoint


@dataclass(frozen=True)
class Output:
    """One downstream input and the batch size its reader asked for."""

    endpoint: Endpoint
    batch: int
    stage: str = ""  # the reading stage, for messages


@dataclass(frozen=True)
class WorkerContext:
    """Everything a worker needs, as plain data (it crosses ``exec`` for spawn)."""

    pipeline: str
    base_dir: str
    stage: StageSpec
    index: int
    generation: int
    report_fd: int
    input: Endpoint | None
    outputs: tuple[Output, ...]
    slot_fd: int | None = None  # the slot file (transport.slot)
    state_dir: str = ""

    @property
    def title(self) -> str:
        return f"procd: {self.pipeline}/{self.stage.name}[{self.index}]"
