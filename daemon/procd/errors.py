"""Error types shared by every layer of procd.

A leaf module: it imports nothing from the package but ``frozen``, another leaf. Each error says
what is wrong in a whole sentence; the command line turns them into exit codes (see ``cli``).
"""

from __future__ import annotations

from procd.frozen import frozen_dataclass


@frozen_dataclass(frozen=True)  # its methods need not be compiled at each start
class Problem:
    """One thing wrong with a pipeline file, located by its dotted key path."""

    path: str
    message: str

    def render(self, file: str) -> str:
        """Return the problem as the one-line form the user sees: ``FILE: key.path: message``
        (a control character from the file or from stage code is escaped: one problem, one line)."""
        line = f"{file}: {self.path}: {self.message}" if self.path else f"{file}: {self.message}"
        return line if line.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)


class ProcdError(Exception):
    """Base of every error procd raises on purpose."""


class ConfigError(ProcdError):
    """A pipeline file is unreadable or invalid; carries every problem found, not just the first."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = tuple(problems)
        super().__init__("\n".join(p.render(file) for p in self.problems))

    def lines(self) -> list[str]:
        """Return one ``FILE: key.path: message`` line per problem."""
        return [p.render(self.file) for p in self.problems]


class StoreError(ProcdError):
    """A durable queue's database cannot be used; the message names the file and the reason."""


class TransitionError(ProcdError):
    """The lifecycle table has no entry for a (state, event) pair: a bug in the supervisor."""
