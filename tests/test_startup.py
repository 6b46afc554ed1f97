"""Start-up: each command imports only what it needs, and what the supervisor does not import, its
workers (forks of it) do not carry. Asserted on ``sys.modules``, never on timings (those are
bench/startup.py's)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from conftest import Workspace

# Modules that cost a command tens of milliseconds (bench/README.md, "Start-up").
HEAVY = ("argparse", "structlog", "dataclasses", "asyncio.base_events", "ssl", "tomllib", "procd.supervisor.core")
# What ``inspect`` imports when it runs (it is deferred: in sys.modules, unrun, for the commands
# that do not start a supervisor), and what ``hashlib`` loads (libcrypto): neither a client verb
# nor the ``procd check`` process itself (its stage code is checked in a child) needs them.
INSPECT_RAN = {"ast", "dis"}


def _modules_after(argv: list[str], cwd: str) -> tuple[int, set[str]]:
    """Run ``cli.main(argv)`` in a fresh interpreter; its exit code and the modules it imported."""
    script = (
        "import json, sys\n"
        "from procd import cli\n"
        f"code = cli.main({argv!r})\n"
        "print(json.dumps([code, sorted(sys.modules)]), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    code, modules = json.loads(proc.stderr.splitlines()[-1])
    return code, set(modules)


def test_version_imports_nothing_beyond_the_cli(ws: Workspace) -> None:
    code, modules = _modules_after(["--version"], str(ws.path))
    assert code == 0
    assert {m for m in modules if m.startswith("procd")} == {"procd", "procd.cli"}
    assert not modules & set(HEAVY)


def test_status_and_check_import_neither_the_supervisor_nor_structlog(ws: Workspace) -> None:
    code, modules = _modules_after(["status", "--control", str(ws.path / "none.sock")], str(ws.path))
    assert code == 1  # no pipeline there: said so, and the imports are what was needed to say it
    assert "procd.ops.commands" in modules
    assert not modules & {"procd.ops.control", "procd.ops.connections", "socket"}  # the server's side
    assert not modules & {"structlog", "procd.supervisor.core", "procd.config", "tomllib", "asyncio.base_events"}
    assert not modules & {"procd.log", "_hashlib", "shutil", "pathlib", "procd.cli.running", "typing", *INSPECT_RAN}

    ws.write("st.py", "def numbers():\n    yield 1\n\ndef drop(item):\n    pass\n")
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\n[stages.drop]\nfunction = "st:drop"\ninputs = ["numbers"]\n'
    )
    code, modules = _modules_after(["check", f"{ws.name}.toml"], str(ws.path))
    assert code == 0
    assert not modules & {
        "structlog",
        "procd.supervisor.core",
        "procd.launch.environment",
        "asyncio.base_events",
        "ssl",
        "procd.log",
        "_hashlib",
        "shutil",
        "pathlib",
        "procd.cli.running",
        "procd.cli.records",
        *INSPECT_RAN,
    }


# Imported by the check child once per stage (each stage afresh): on its second import it notes
# whether checking the first stage loaded ``hashlib`` (libcrypto) for a code hash, and whether it
# ran ``inspect`` (deferred by the command line) to read the function's parameters.
NOTING_CHECK_STAGES = """
import os
import sys

with open(os.path.join(os.path.dirname(__file__), "noted.txt"), "a") as note:
    inspect_ran = "signature" in vars(sys.modules["inspect"])
    note.write(f"{'_hashlib' in sys.modules},{inspect_ran}\\n")


def numbers(limit: int = 3):
    yield 1


def drop(item, path: "Path" = None):
    pass
"""


def test_procd_check_of_plain_functions_hashes_nothing_and_runs_no_inspect(ws: Workspace) -> None:
    ws.write("st.py", NOTING_CHECK_STAGES)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\n[stages.drop]\nfunction = "st:drop"\ninputs = ["numbers"]\n'
    )
    code, modules = _modules_after(["check", f"{ws.name}.toml"], str(ws.path))
    assert code == 0
    assert "procd.lifecycle" not in modules  # the model reads the restart policy's words from procd.restarts
    assert (ws.path / "noted.txt").read_text().split() == ["False,False", "False,False"]
    (ws.path / "noted.txt").unlink()
    result = ws.run("run", f"{ws.name}.toml")  # a reload compares the hashes: run computes them
    assert result.code == 0, result.stderr
    assert (ws.path / "noted.txt").read_text().split()[:2] == ["False,False", "True,False"]


def test_a_command_builds_its_own_parser_alone_and_the_same_one() -> None:
    from procd import cli

    def verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return parser._subparsers._group_actions[0].choices  # type: ignore[union-attr,return-value]

    every = verbs(cli._parser())
    assert {"run", "status", "stop", "reload", "scale", "logs", "dlq", "check", "init"} <= set(every)
    for name, full in every.items():
        alone = verbs(cli._parser(name))
        assert list(alone) == [name]
        assert alone[name].format_help() == full.format_help()
    assert list(verbs(cli._parser("no-such-command"))) == list(every)


# The stage module is imported in the worker, after the fork: what it finds already run in
# sys.modules is what the supervisor ran. Then it uses asyncio, submodule first, as a stage may.
ASYNC_STAGES = """
import sys

SUPERVISOR_RAN_ASYNCIO = "asyncio.base_events" in sys.modules
SUPERVISOR_RAN_UUID = "uuid4" in sys.modules["uuid"].__dict__ if "uuid" in sys.modules else False
SUPERVISOR_HAD = sorted(m for m in ("_hashlib", "procd.launch.environment", "procd.launch.reloadcheck") if m in sys.modules)

import asyncio.subprocess
import asyncio
import uuid


def numbers():
    yield {"supervisor_ran": [SUPERVISOR_RAN_ASYNCIO, SUPERVISOR_RAN_UUID], "uuid": len(str(uuid.uuid4()))}
    yield {"supervisor_had": SUPERVISOR_HAD}
    for n in range(3):
        yield {"n": n}


async def _double(n):
    await asyncio.sleep(0)
    return 2 * n


def double(item):
    if "n" in item:
        item["doubled"] = asyncio.run(_double(item["n"]))
    return item


def show(item):
    print("item", __import__("json").dumps(item, sort_keys=True), flush=True)
"""


def test_the_supervisor_does_not_run_asyncio_or_uuid_and_a_stage_still_can(ws: Workspace) -> None:
    ws.write("st.py", ASYNC_STAGES)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\n'
        '[stages.double]\nfunction = "st:double"\ninputs = ["numbers"]\n'
        '[stages.show]\nfunction = "st:show"\ninputs = ["double"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    items = [json.loads(line.split(" ", 1)[1]) for line in result.output_lines("show") if line.startswith("item ")]
    assert {"supervisor_ran": [False, False], "uuid": 36} in items
    # Nor libcrypto (hashlib: code hashes are the check child's), the environment builder or the
    # reload check, which a pipeline without packages, not reloaded, never uses.
    assert {"supervisor_had": []} in items
    assert sorted(i["doubled"] for i in items if "n" in i) == [0, 2, 4]


# Imported in the check child and in each worker: it notes whether the process it runs in had the
# supervisor's modules when it was forked.
NOTING_STAGES = """
import os
import sys

with open(os.path.join(os.path.dirname(__file__), "imported.txt"), "a") as note:
    note.write(f"{'procd.supervisor.core' in sys.modules}\\n")


def numbers():
    yield 1


def drop(item):
    pass
"""


def test_procd_run_checks_the_stage_code_while_it_imports_the_supervisor(ws: Workspace) -> None:
    ws.write("st.py", NOTING_STAGES)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\n[stages.drop]\nfunction = "st:drop"\ninputs = ["numbers"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    # the check child (which imports the module once per stage) was forked before the supervisor's
    # modules were imported; the two workers after
    noted = (ws.path / "imported.txt").read_text().split()
    assert set(noted[:-2]) == {"False"} and noted[-2:] == ["True", "True"]


def test_a_check_not_waited_for_is_ended_by_close(ws: Workspace) -> None:
    from procd import callables, config

    ws.write("slow.py", "import time\ntime.sleep(60)\n\ndef numbers():\n    yield 1\n")
    spec = config.load_pipeline(str(ws.pipeline('[stages.numbers]\nfunction = "slow:numbers"\n')))
    check = callables.CheckApart(spec, timeout_s=60)
    check.close()  # killed and reaped at once: the conftest's check finds no child left behind
    check.close()  # and a second close does nothing


INSPECTING_STAGES = """
import sys


def numbers(shard):
    # after the worker asked whether this producer takes checkpoint and shard (it takes shard)
    yield {"shard": list(shard), "inspect_ran": "signature" in vars(sys.modules["inspect"])}


def show(item):
    print("item", __import__("json").dumps(item, sort_keys=True), flush=True)
"""


def test_neither_the_supervisor_nor_a_plain_producer_runs_inspect(ws: Workspace) -> None:
    ws.write("st.py", INSPECTING_STAGES)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\nprocesses = 2\n'
        '[stages.show]\nfunction = "st:show"\ninputs = ["numbers"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    items = [json.loads(line.split(" ", 1)[1]) for line in result.output_lines("show") if line.startswith("item ")]
    assert sorted(items, key=lambda i: i["shard"]) == [
        {"shard": [0, 2], "inspect_ran": False},
        {"shard": [1, 2], "inspect_ran": False},
    ]


def _wrapped(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return wrapper


def test_accepts_answers_from_the_code_as_inspect_does() -> None:
    import inspect

    from procd import callables

    def plain(item, checkpoint=None, *rest, shard, **options):  # type: ignore[no-untyped-def]
        pass

    def positional_only(checkpoint, /, shard):  # type: ignore[no-untyped-def]
        pass

    def keywords(**checkpoint):  # type: ignore[no-untyped-def]
        pass

    def signed(item):  # type: ignore[no-untyped-def]
        pass

    signed.__signature__ = inspect.Signature([inspect.Parameter("checkpoint", inspect.Parameter.KEYWORD_ONLY)])  # type: ignore[attr-defined]

    class Producer:
        def __init__(self, checkpoint: object) -> None:
            pass

    targets = [plain, positional_only, keywords, signed, _wrapped(plain), Producer, functools.partial(plain, 1)]
    for target in targets:
        for name in ("item", "checkpoint", "shard", "rest", "options", "missing"):
            parameter = inspect.signature(target).parameters.get(name)
            expected = parameter is not None and parameter.kind in (
                parameter.POSITIONAL_OR_KEYWORD,
                parameter.KEYWORD_ONLY,
            )
            assert callables.accepts(target, name) == expected, (target, name)


PLAIN_FUNCTIONS = """
from __future__ import annotations

import pathlib
from pathlib import Path


def everything(item, a, /, b: int, c: "Path" = None, *rest: str, d, e: pathlib.Path = None, **more: int) -> None:
    pass


def defaults_on_positional_only(a=1, b=2, /, c=3):
    pass


def keywords_only(*, out: Path, level: int = 3):
    pass


def unknown_name(item, out: NoSuchName, limit: int = 2) -> AlsoMissing:
    pass


def type_error(item, out: 1 + "a"):
    pass


def empty():
    pass


def bare_varargs(*args, **kwargs):
    pass
"""


def test_parameters_are_read_from_a_plain_function_s_code_as_inspect_reads_them() -> None:
    from procd import callables

    namespace: dict[str, Any] = {}
    exec(compile(PLAIN_FUNCTIONS, "<plain>", "exec"), namespace)

    def via_inspect(target: Any) -> list[tuple[str, int, bool, Any]] | None:
        signature = callables._signature(target)
        if signature is None:
            return None
        return [
            (p.name, int(p.kind), p.default is not p.empty, None if p.annotation is p.empty else p.annotation)
            for p in signature.parameters.values()
        ]

    def via_code(target: Any) -> list[tuple[str, int, bool, Any]] | None:
        found = callables._parameters(target)
        return None if found is None else [(p.name, p.kind, p.has_default, p.annotation) for p in found.values()]

    names = ("everything", "defaults_on_positional_only", "keywords_only", "unknown_name", "type_error", "empty")
    for name in (*names, "bare_varargs"):
        target = namespace[name]
        assert callables._plain_code(target) is not None, name
        assert via_code(target) == via_inspect(target), name
    assert via_code(namespace["type_error"]) is None  # inspect cannot say either: no option is checked
    assert via_code(namespace["unknown_name"])[1][3] == "NoSuchName"  # type: ignore[index]  # left as written
    assert via_code(namespace["everything"])[6][3] is namespace["Path"]  # type: ignore[index]  # evaluated


def test_a_check_report_cut_off_by_the_child_s_end_is_left_out() -> None:
    from procd import callables

    reports = [{"importing": "a"}, {"stage": "a", "problems": [["stages.a", "é\n"]], "shardable": True}]
    r, w = os.pipe()
    try:
        for report in reports:
            callables._report(w, report)
        whole = os.read(r, 1 << 16)
    finally:
        os.close(r)
        os.close(w)
    first = 4 + int.from_bytes(whole[:4], "little")
    assert list(callables._reports(whole)) == reports
    for cut in range(len(whole)):  # the child killed at any byte of its reports
        assert list(callables._reports(whole[:cut])) == (reports[:1] if cut >= first else [])
