"""`procd check` tells the truth: whatever the stage code does, it exits 0 or 78, and it finds at
once what would fail as soon as the pipeline runs (imports, options, programs, producers)."""

from __future__ import annotations

import os

import pytest

from conftest import Workspace
from procd import callables, config
from procd.errors import Problem

STAGE = '[stages.a]\nfunction = "st:f"\n'


def _check(ws: Workspace, module: str, pipeline: str = STAGE) -> tuple[int, list[str]]:
    ws.write("st.py", module)
    ws.pipeline(pipeline)
    result = ws.run("check", f"{ws.name}.toml")
    assert "Traceback" not in result.stderr
    return result.code, [line.removeprefix(f"{ws.name}.toml: ") for line in result.stderr.splitlines()]


@pytest.mark.parametrize(
    ("module", "problem"),
    [
        ("raise SystemExit(3)\n", 'stages.a.function: cannot import module "st": SystemExit: 3 (at st.py:1)'),
        ("raise KeyboardInterrupt\n", 'stages.a.function: cannot import module "st": KeyboardInterrupt (at st.py:1)'),
        (
            "def __getattr__(name):\n    raise RuntimeError('no ' + name)\n",
            'stages.a.function: getting "f" from module "st" failed: RuntimeError: no f (at st.py:2)',
        ),
        (
            "def __getattr__(name):\n    raise SystemExit(1)\n",
            'stages.a.function: getting "f" from module "st" failed: SystemExit: 1 (at st.py:2)',
        ),
        ("import os\nos._exit(5)\n", 'stages.a.function: importing "st:f" ended the check process (exit code 5)'),
        (
            # a process forked at import outlives the check and holds its pipe: the check goes on
            # (until the procd check that started it has gone)
            "import os, time\ncheck = os.getppid()\nif os.fork() == 0:\n"
            "    os.closerange(0, 3)\n"  # not the test's: only the check's pipe stays open
            "    while os.path.exists(f'/proc/{check}'):\n        time.sleep(0.05)\n    os._exit(0)\n",
            'stages.a.function: module "st" has no attribute "f"',
        ),
        (
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
            'stages.a.function: importing "st:f" ended the check process (SIGKILL)',
        ),
        (
            "x = 1\n\ndef f(:\n    pass\n",
            'stages.a.function: cannot import module "st": SyntaxError: invalid syntax (at st.py:3)',
        ),
        (
            "import helper\n",
            'stages.a.function: cannot import module "st": ZeroDivisionError: division by zero (at helper.py:2)',
        ),
    ],
)
def test_check_exits_78_whatever_the_module_does(ws: Workspace, module: str, problem: str) -> None:
    ws.write("helper.py", "x = 1\ny = 1 / 0\n")
    assert _check(ws, module) == (78, [problem])


def test_options_are_bound_to_the_signature(ws: Workspace) -> None:
    module = (
        "def numbers(count, start=0):\n    yield from range(start, count)\n"
        "def scale(item, factor):\n    return item * factor\n"
        "class Sink:\n    def __init__(self, path, *, mode='w'):\n        pass\n    def __call__(self, item):\n        pass\n"
        "def anything(item, **options):\n    return item\n"
    )
    pipeline = (
        '[stages.a]\nfunction = "st:numbers"\noptions = { cuont = 10 }\n'
        '[stages.b]\nfunction = "st:scale"\ninputs = ["a"]\noptions = { item = 1, factor = 2 }\n'
        '[stages.c]\nfunction = "st:Sink"\ninputs = ["b"]\noptions = { path = "x", mood = "a", zzz = 1 }\n'
        '[stages.d]\nfunction = "st:anything"\ninputs = ["b"]\noptions = { whatever = 1 }\n'
    )
    assert _check(ws, module, pipeline) == (
        78,
        [
            'stages.a.options.cuont: unexpected option; did you mean "count"?',
            'stages.a.options: missing required option "count"',
            "stages.b.options.item: is the item parameter of st:scale; an option cannot set it",
            'stages.c.options.mood: unexpected option; did you mean "mode"?',
            "stages.c.options.zzz: unexpected option; st:Sink takes path, mode",
        ],
    )


def test_a_commands_program_is_looked_up_as_exec_will(ws: Workspace) -> None:
    ws.write("not-executable.sh", "#!/bin/sh\ncat\n")
    ws.write("runs.sh", "#!/bin/sh\ncat\n")
    os.chmod(ws.path / "runs.sh", 0o755)
    pipeline = (
        '[stages.a]\ncommand = ["seq", "3"]\n'
        '[stages.b]\ncommand = ["no-such-program-procd"]\ninputs = ["a"]\n'
        '[stages.c]\ncommand = ["./not-executable.sh"]\ninputs = ["a"]\n'
        '[stages.d]\ncommand = ["./runs.sh"]\ninputs = ["a"]\n'
        '[stages.e]\ncommand = ["./absent.sh"]\ninputs = ["a"]\n'
    )
    code, lines = _check(ws, "", pipeline)
    assert code == 78
    assert lines == [
        f'stages.b.command[0]: program "no-such-program-procd" not found on PATH ({os.environ["PATH"]})',
        'stages.c.command[0]: program "./not-executable.sh" is not an executable file',
        f'stages.e.command[0]: program "./absent.sh" not found (relative to {ws.path})',
    ]


def test_every_problem_is_listed_at_once(ws: Workspace) -> None:
    module = "def f():\n    yield 1\ndef g(item, count):\n    return item\n"
    pipeline = (
        '[stages.a]\nfunction = "st:f"\nprocesses = "four"\n'
        '[stages.b]\nfunction = "st:g"\ninputs = ["a", "nope"]\noptions = { cuont = 1 }\n'
        '[stages.c]\nfunction = "st:missing"\ninputs = ["a"]\n'
    )
    code, lines = _check(ws, module, pipeline)
    assert code == 78
    assert lines == [
        f'stages.a.processes: expected an integer from 1 to {config.default_max_processes()}, got "four" (str)',
        'stages.b.inputs[1]: unknown stage "nope"; stages are a, b, c',
        'stages.b.options.cuont: unexpected option; did you mean "count"?',
        'stages.b.options: missing required option "count"',
        'stages.c.function: module "st" has no attribute "missing"',
    ]


def test_a_producer_in_several_processes_must_declare_its_shard(ws: Workspace) -> None:
    module = (
        "def f():\n    yield 1\n"
        "def sharded(shard, count=10):\n    index, total = shard\n    yield from range(index, count, total)\n"
        "def kept(shard, checkpoint):\n    yield 1\n"
    )
    pipeline = (
        '[stages.a]\nfunction = "st:f"\nprocesses = 2\n'
        '[stages.b]\nfunction = "st:sharded"\nprocesses = 3\n'
        '[stages.c]\ncommand = ["seq", "3"]\nprocesses = 2\n'
        '[stages.d]\nfunction = "st:kept"\nprocesses = 2\n'
    )
    assert _check(ws, module, pipeline) == (
        78,
        [
            'stages.a.processes: a producer in 2 processes yields every item 2 times; give st:f a "shard" '
            "parameter to split its work (see the README), or set processes = 1",
            "stages.c.processes: a producing command in 2 processes runs 2 times and yields every item as often; "
            "set processes = 1",
            "stages.d.processes: a producer in several processes cannot keep a checkpoint (its processes would share one)",
        ],
    )


def test_check_passes_a_good_file(ws: Workspace) -> None:
    ws.write("st.py", "def f(shard):\n    yield shard.index\ndef g(item):\n    return item\n")
    ws.pipeline('[stages.a]\nfunction = "st:f"\nprocesses = 2\n[stages.b]\nfunction = "st:g"\ninputs = ["a"]\n')
    result = ws.run("check", f"{ws.name}.toml")
    assert (result.code, result.stdout) == (0, f"{ws.name}.toml: ok (2 stages, 3 processes)\n")


def test_path_options_are_relative_to_the_pipeline_file(ws: Workspace) -> None:
    # only an option whose parameter is annotated pathlib.Path is a path; any other is passed as written
    ws.write("p/data/in.txt", "one\ntwo\n")
    ws.write(
        "p/st.py",
        """
        from pathlib import Path

        def read(path: Path, note: str):
            print("note", note, flush=True)
            yield from path.read_text().split()

        def show(line):
            print("got", line, flush=True)
        """,
    )
    ws.write(
        "p/paths.toml",
        '[stages.read]\nfunction = "st:read"\noptions = { path = "data/in.txt", note = "data/in.txt" }\n'
        '[stages.show]\nfunction = "st:show"\ninputs = ["read"]\n',
    )
    result = ws.run("run", "p/paths.toml")  # from the directory above the file's
    assert result.code == 0, result.stderr
    assert result.output_lines("read") == ["note data/in.txt"]
    assert result.output_lines("show") == ["got one", "got two"]
    ws.write("p/bad.toml", '[stages.read]\nfunction = "st:read"\noptions = { path = 3, note = "x" }\n')
    bad = ws.run("check", "p/bad.toml")
    assert (bad.code, bad.stderr) == (
        78,
        "p/bad.toml: stages.read.options.path: expected a path (the parameter is a Path), got 3 (int)\n",
    )


def test_an_import_that_never_ends_is_stopped_and_reported(ws: Workspace) -> None:
    ws.write("st.py", "import time\nwhile True:\n    time.sleep(1)\n")
    ws.write("quick.py", "import os\ndef g(item):\n    return item\ndef h(item, n):\n    return item\n")
    ws.write("leaves.py", "import os\nos._exit(9)\n")
    file = ws.pipeline(
        '[stages.a]\ncommand = ["cat"]\n'
        '[stages.b]\nfunction = "leaves:g"\ninputs = ["a"]\n'
        '[stages.c]\nfunction = "quick:h"\ninputs = ["a"]\n'  # checked after b ended its child
        '[stages.d]\nfunction = "st:f"\ninputs = ["a"]\n'
        '[stages.e]\nfunction = "quick:g"\ninputs = ["a"]\n'
    )
    codes = callables.check_callables_apart(config.load_pipeline(file), timeout_s=2)
    assert {name: code.problems for name, code in codes.items()} == {
        "a": (),
        "b": (Problem("stages.b.function", 'importing "leaves:g" ended the check process (exit code 9)'),),
        "c": (Problem("stages.c.options", 'missing required option "n"'),),
        "d": (Problem("stages.d.function", 'importing "st:f" did not finish within 2s'),),
        "e": (Problem("stages.e", "not checked: the check of the stage code did not finish within 2s"),),
    }
