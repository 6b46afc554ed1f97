"""One row of issue 12's table, as every benchmark reports it, and the table they make together.

A row holds procd's figure, its anchor's figure side by side (measured in the same run), the ratio
between them and the issue's target. ``value`` is the headline number the target is judged on;
``met`` is None where a target is not a simple bound on it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from procfs import load_text, machine


@dataclass(frozen=True)
class Row:
    key: str  # stable name a test looks for
    measure: str
    procd: str
    anchor: str
    ratio: str
    target: str
    value: float
    met: bool | None


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` 0.99 for p99) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(a: float, b: float) -> str:
    """``a / b`` as ``1.23x`` (``-`` when b is 0)."""
    return f"{a / b:.2f}x" if b else "-"


def header() -> str:
    info = machine()
    return f"machine: {info['cores']} cores, {info['cpu']}; at start: {load_text()}"


def table(rows: Sequence[Row]) -> str:
    """The rows as aligned text, one per line, with a head line."""
    head = ("measure", "procd", "anchor (same run)", "ratio", "target", "met")
    cells = [head] + [
        (r.measure, r.procd, r.anchor, r.ratio, r.target, {True: "yes", False: "no", None: "-"}[r.met]) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [" | ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def print_rows(rows: Sequence[Row]) -> None:
    """What a benchmark run alone prints: the machine, its rows, the load at the end."""
    print(header())
    print(table(rows))
    print(f"at end: {load_text()}")
