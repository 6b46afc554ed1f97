"""Worker reports: what the worker encodes is what the supervisor decodes, and nothing else is."""

from __future__ import annotations

import pytest

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
