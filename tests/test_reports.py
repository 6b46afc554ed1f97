"""Worker reports: what the worker encodes is what the supervisor decodes, and nothing else is."""

from __future__ import annotations

import pytest

from conftest import Workspace
from procd import reports


@pytest.mark.parametrize(
    "report",
    [
        reports.WorkerReady(),
        reports.Error("KeyError", "'id'", item="{'x': 1}", traceback="Traceback ..."),
        reports.ExecFailed(2, "No such file or directory", "nosuch"),
        reports.Counts(items_in=3, items_out=7),
        reports.DeadLettered("ValueError", "bad", 3, "/tmp/dl.jsonl", item={"id": 1}),
    ],
)
def test_a_report_comes_back_as_it_was_sent(report: reports.Report) -> None:
    line = reports.encode(report)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert reports.decode(line.decode()) == report


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[" * 60000, "not JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (
            '{"kind": "hello"}',
            "unknown report kind 'hello'; kinds are counts, dead_lettered, error, exec_failed, ready",
        ),
        ('{"items_in": 1}', "unknown report kind None"),
        ('{"kind": "counts", "items_in": 1}', "counts: "),
        ('{"kind": "counts", "items_in": "1", "items_out": 2}', "counts: items_in must be int, got '1'"),
        ('{"kind": "counts", "items_in": true, "items_out": 2}', "counts: items_in must be int, got True"),
        ('{"kind": "ready", "extra": 1}', "ready: "),
    ],
)
def test_anything_else_is_a_clear_error(line: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        reports.decode(line)
    assert str(caught.value).startswith(message)


BAD_REPORTER = """
import gc, os
from procd.worker.reporter import Reporter

def numbers():
    yield from range(3)

def garble(n):
    if n == 0:  # write what no report decodes to, on this worker's own report pipe
        (reporter,) = [o for o in gc.get_objects() if isinstance(o, Reporter)]
        os.write(reporter._fd, b'{"kind": "counts", "items_in": "many", "items_out": 0}\\n[1]\\n{"kind": "hello"}\\n')
    return n

def sink(n):
    pass
"""


def test_a_line_the_supervisor_cannot_decode_is_a_record_naming_the_worker(ws: Workspace) -> None:
    ws.write("st.py", BAD_REPORTER)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\n'
        '[stages.garble]\nfunction = "st:garble"\ninputs = ["numbers"]\n'
        '[stages.sink]\nfunction = "st:sink"\ninputs = ["garble"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr  # the supervisor goes on, and the pipeline ends as ever
    invalid = result.events("worker_report_invalid")
    assert [(r["stage"], r["worker"]) for r in invalid] == [("garble", 0)] * 3
    assert [r["error"] for r in invalid] == [
        "counts: items_in must be int, got 'many'",
        "expected a JSON object, got list",
        "unknown report kind 'hello'; kinds are counts, dead_lettered, error, exec_failed, ready",
    ]
    assert all(isinstance(r["pid"], int) for r in invalid)
    (drained,) = result.events("stage_drained", stage="sink")
    assert drained["items_in"] == 3
