"""The stages: a producer of sentences, a tokenizer, and a counting sink."""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator

from textstats import __version__

TEXT = """\
A pipeline is a TOML file. procd reads it, starts each stage as a group of processes,
joins the stages with bounded queues, and supervises every process. A stage whose code
lives in a project is built with the project's own build backend into the pipeline's
own environment, and its workers run in that environment's interpreter.
"""


def sentences(repeat: int = 100) -> Iterator[str]:
    """Producer: every line of the text, ``repeat`` times."""
    for _ in range(repeat):
        yield from TEXT.splitlines()


def words(line: str) -> Iterator[str]:
    """Transform: one line in, its lower-cased words out."""
    yield from re.findall(r"[a-z']+", line.lower())


class Count:
    """Sink: counts the words and prints the most common when the stream ends."""

    def __init__(self, top: int = 5) -> None:
        self.top = top
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, word: str) -> None:
        self.counts[word] += 1

    def close(self) -> None:
        common = ", ".join(f"{word} {n}" for word, n in self.counts.most_common(self.top))
        print(f"textstats {__version__}: {sum(self.counts.values())} words; most common: {common}")
