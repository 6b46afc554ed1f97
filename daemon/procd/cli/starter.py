"""The files ``procd init NAME`` writes: a commented starter pipeline and its stage module."""

from __future__ import annotations

PIPELINE = """\
# A procd pipeline. Run it with:  procd run {name}.toml
# Every key is described in the README ("The pipeline file").

[pipeline]
name = "{name}"
# How function stages start: "fork" (default), "spawn" or "forkserver".
start_method = "fork"
# How long a stop may take before procd sends SIGKILL.
stop_timeout = "10s"

# A producer: no inputs. Its function is a generator; every value it yields goes downstream.
[stages.numbers]
function = "{module}:numbers"
options = {{ count = 1000 }}

# Called once per item, in 2 processes. Return an item, yield several, or return None to drop it.
[stages.square]
function = "{module}:square"
inputs = ["numbers"]
processes = 2
queue = {{ maxsize = 10000, batch = 256 }}

# A sink: nothing reads from it. A class stage is built once per process; close() runs at the end.
[stages.total]
function = "{module}:Total"
inputs = ["square"]
"""

MODULE = '''\
"""Stage code for the {name} pipeline."""


def numbers(count):
    """Producer: yields the integers 0 .. count-1."""
    yield from range(count)


def square(n):
    """Transform: one item in, one item out."""
    return {{"n": n, "square": n * n}}


class Total:
    """Sink: adds up what arrives and prints the sum when the stream ends."""

    def __init__(self):
        self.total = 0

    def __call__(self, item):
        self.total += item["square"]

    def close(self):
        print(f"sum of squares: {{self.total}}")
'''


def render(name: str) -> dict[str, str]:
    """Return ``{file name: text}`` for a pipeline called ``name``."""
    module = f"{name.replace('-', '_').replace('.', '_')}_stages"
    return {
        f"{name}.toml": PIPELINE.format(name=name, module=module),
        f"{module}.py": MODULE.format(name=name),
    }
