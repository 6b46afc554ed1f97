"""The supervisor's book of stage inputs: each queue, which live processes hold which of its
ends, and when the supervisor may let go of its own copies.

A stage has one current channel. A reload that changes a stage's queue retires the old channel:
its readers drain it while its last writers end, and only then is it closed. End of stream for a
channel is the moment the supervisor closes its writing end (see ``supervisor``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from procd import procinfo, queues
from procd.config import QueueSpec


@dataclass(eq=False)
class Channel:
    """One stage input queue as the supervisor sees it."""

    stage: str
    spec: QueueSpec
    fds: queues.QueueFds
    current: bool = True
    writing: bool = True  # the supervisor still holds the writing end
    writers: set[int] = field(default_factory=set)  # pids of live processes that hold it too
    readers: set[int] = field(default_factory=set)

    @classmethod
    def create(cls, stage: str, spec: QueueSpec) -> Channel:
        return cls(stage, spec, queues.create_queue(spec.slots, spec.path))

    @property
    def ended(self) -> bool:
        """The end of stream has been given: no new writer will ever get this queue."""
        return not self.writing

    def end(self) -> None:
        """Close the supervisor's writing end; readers see the end once the last writer exits."""
        if self.writing:
            os.close(self.fds.write_fd)
            self.writing = False

    def drained(self) -> bool:
        """A retired channel that nobody holds any more."""
        return not self.current and not self.writing and not self.readers

    def close(self) -> None:
        self.end()
        queues.close_fds((self.fds.read_fd, self.fds.slots_fd))

    def depth(self) -> int | None:
        """Messages waiting, from the free-slot counter; None when it cannot be read."""
        free = procinfo.eventfd_count(self.fds.slots_fd)
        return None if free is None else self.spec.slots - free
