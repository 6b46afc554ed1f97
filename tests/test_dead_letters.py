"""Dead letters that tell the truth: a dead letter that cannot be written is a failure, the file
holds nothing but records whatever the stage does to its descriptors, and items are JSON."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Workspace

POISON = """
import os

def numbers(count):
    yield from range(count)

def reject(n):
    raise ValueError(f"item {n} is rejected, with a long enough message to fill a disk quickly")

def closes_its_stdout(n):
    if n == 0:
        os.close(1)
        os.close(2)
    if n % 2:
        raise ValueError(f"odd {n}")
    try:
        os.write(1, f"printed {n}\\n".encode())
    except OSError:
        pass
    return n

def sink(n):
    pass
"""


def test_a_dead_letter_that_cannot_be_written_fails_the_run_and_tears_no_record(
    ws: Workspace,
    small_disk: Path,
) -> None:
    ws.write("st.py", POISON)
    dead = small_disk / "dead.jsonl"
    ws.pipeline(
        '[pipeline]\nstop_timeout = "1s"\n'  # the producer waits on the queue the fatal stage left full
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 2000 }\n'
        f'[stages.reject]\nfunction = "st:reject"\ninputs = ["numbers"]\nmax_attempts = 1\ndead_letter = "{dead}"\n'
        'restart = { max = 2, within = "60s", backoff = "10ms" }\nqueue = { maxsize = 100, batch = 10 }\n'
    )
    result = ws.run("run", f"{ws.name}.toml", timeout=60)
    assert result.code == 1, result.stderr[-2000:]
    written = [json.loads(line) for line in dead.read_text().splitlines()]  # every line a whole record
    assert 0 < len(written) < 2000
    reported = result.events("item_dead_lettered")
    assert [r["item"] for r in reported] == [w["item"] for w in written]  # each one said written is there
    failures = result.events("worker_error", error_type="DeadLetterNotWritten")
    assert failures and failures[0]["error"] == f"cannot write a dead letter to {dead}: No space left on device"
    # the first item that did not fit (a restarted worker may then fit a shorter WorkerCrashed record)
    assert int(failures[0]["item"]) == max(w["item"] for w in written if w["error_type"] == "ValueError") + 1
    stopped = result.events("pipeline_stopped")[0]
    assert stopped["outcome"] == "failed" and stopped["exit_code"] == 1
    assert result.events("stage_fatal", stage="reject")


def test_a_stage_that_closes_stdout_never_prints_into_its_dead_letter_file(ws: Workspace) -> None:
    ws.write("st.py", POISON)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 200 }\n'
        '[stages.closer]\nfunction = "st:closes_its_stdout"\ninputs = ["numbers"]\nmax_attempts = 1\n'
        'dead_letter = "dead.jsonl"\nqueue = { maxsize = 100, batch = 10 }\n'
        '[stages.sink]\nfunction = "st:sink"\ninputs = ["closer"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr[-2000:]
    lines = (ws.path / "dead.jsonl").read_text().splitlines()
    assert [json.loads(line)["item"] for line in lines] == list(range(1, 200, 2))


def test_items_are_json_in_the_record_the_file_and_dlq_list(ws: Workspace) -> None:
    ws.write(
        "st.py",
        """
        def items():
            yield {"id": 7, "tags": ["a", "b"], "ok": None}
            yield {1, 2}
            yield float("nan")
            yield "x" * 5000
        def reject(item):
            raise ValueError("no")
        """,
    )
    ws.pipeline(
        '[stages.items]\nfunction = "st:items"\n'
        '[stages.reject]\nfunction = "st:reject"\ninputs = ["items"]\nmax_attempts = 1\ndead_letter = "dead.jsonl"\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr[-2000:]
    first, a_set, nan, long = result.events("item_dead_lettered")
    assert first["item"] == {"id": 7, "tags": ["a", "b"], "ok": None}
    assert a_set["item_repr"] == "{1, 2}" and "item" not in a_set
    assert nan["item_repr"] == "nan"  # NaN is not JSON
    assert long["item_json_start"] == json.dumps("x" * 5000)[:1000]
    entries = [json.loads(line) for line in (ws.path / "dead.jsonl").read_text().splitlines()]
    assert entries[0]["item"] == first["item"] and entries[3]["item"] == "x" * 5000
    assert entries[1]["item_repr"] == "{1, 2}" and "item" not in entries[1]
    shown = ws.run("dlq", "list", "dead.jsonl").stdout.splitlines()
    assert shown[0].endswith('item {"id":7,"tags":["a","b"],"ok":null}')
    assert shown[1].endswith("item (repr, not JSON) {1, 2}")
