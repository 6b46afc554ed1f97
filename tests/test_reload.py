"""Reload with a real daemon: only what changed restarts, nothing is lost, a bad file changes nothing."""

from __future__ import annotations

import json
import signal

from conftest import Workspace, read_records, wait_until
from procd import config

STAGES = """
import itertools, time

def endless():
    for n in itertools.count():
        yield n
        time.sleep(0.002)

def tag(n, label):
    return [label, n]

class Count:
    def __init__(self):
        self.n = 0
    def __call__(self, item):
        self.n += 1
    def close(self):
        print("count", self.n, flush=True)
"""

BEFORE = """
[pipeline]
name = "{name}"
[stages.src]
function = "st:endless"
[stages.keep]
function = "st:tag"
inputs = ["src"]
options = { label = "k" }
[stages.ksink]
function = "st:Count"
inputs = ["keep"]
[stages.change]
function = "st:tag"
inputs = ["src"]
processes = 2
options = { label = "v1" }
[stages.csink]
function = "st:Count"
inputs = ["change"]
[stages.gone]
function = "st:tag"
inputs = ["src"]
options = { label = "g" }
"""

AFTER = (
    BEFORE.replace('label = "v1"', 'label = "v2"').replace(
        '[stages.gone]\nfunction = "st:tag"\ninputs = ["src"]\noptions = { label = "g" }\n', ""
    )
    + '[stages.fresh]\nfunction = "st:tag"\ninputs = ["src"]\noptions = { label = "f" }\n'
)


def _pids(ws: Workspace) -> dict[str, list[int]]:
    reply = json.loads(ws.run("status", "--json", "--control", str(ws.control)).stdout)
    return {s["name"]: [w["pid"] for w in s["workers"] if w["pid"]] for s in reply["stages"]}


def _start(ws: Workspace):
    ws.write("st.py", STAGES)
    ws.pipeline(BEFORE)
    return ws.start_ready()


def test_reload_restarts_only_what_changed_and_loses_nothing(ws: Workspace) -> None:
    proc = _start(ws)
    try:
        before = _pids(ws)
        ws.pipeline(AFTER)
        result = ws.run("reload", "--control", str(ws.control))
        assert result.code == 0, result.stderr
        records = wait_until(
            lambda: [r for r in read_records(ws.path / "log.jsonl") if r["event"] == "pipeline_reloaded"]
        )
        assert records[0]["changed"] == ["change", "src"]  # src lost one reader and gained one
        assert records[0]["added"] == ["fresh"] and records[0]["removed"] == ["gone"]
        assert records[0]["unchanged"] == ["csink", "keep", "ksink"]
        after = wait_until(
            lambda: (p := _pids(ws)) and "fresh" in p and len(p["change"]) == 2 and "gone" not in p and p
        )
        for untouched in ("keep", "ksink", "csink"):
            assert after[untouched] == before[untouched]
        assert not set(after["change"]) & set(before["change"])
        assert after["src"] != before["src"]
        wait_until(
            lambda: [
                r for r in read_records(ws.path / "log.jsonl") if r["event"] == "worker_exited" and r["stage"] == "gone"
            ]
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    records = read_records(ws.path / "log.jsonl")
    change_out = sum(r["items_out"] for r in records if r["event"] == "worker_exited" and r["stage"] == "change")
    counted = [r["line"] for r in records if r["event"] == "worker_output" and r["stage"] == "csink"]
    assert counted == [f"count {change_out}"] and change_out > 0  # old and new 'change' fed csink, nothing lost
    gone = [r for r in records if r["event"] == "worker_exited" and r["stage"] == "gone"]
    assert gone[0]["code"] == 0 and gone[0]["expected"]
    spawned = [r for r in records if r["event"] == "worker_spawned" and r["stage"] == "change"]
    assert sorted(r["generation"] for r in spawned) == [1, 1, 2, 2]


def test_an_invalid_file_on_sighup_changes_nothing(ws: Workspace) -> None:
    proc = _start(ws)
    try:
        before = _pids(ws)
        ws.pipeline(BEFORE.replace("processes = 2", 'processes = "two"'))
        proc.send_signal(signal.SIGHUP)
        invalid = wait_until(lambda: [r for r in read_records(ws.path / "log.jsonl") if r["event"] == "config_invalid"])
        assert invalid[0]["problems"] == [
            f'{ws.name}.toml: stages.change.processes: expected an integer from 1 to {config.default_max_processes()}, got "two" (str)'
        ]
        reply = ws.run("reload", "--control", str(ws.control))
        assert reply.code == 1
        assert reply.stderr.splitlines() == [
            "procd reload: the pipeline file is invalid; nothing changed",
            f'{ws.name}.toml: stages.change.processes: expected an integer from 1 to {config.default_max_processes()}, got "two" (str)',
        ]
        assert _pids(ws) == before and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_reload_restarts_the_stages_whose_code_changed(ws: Workspace) -> None:
    ws.write("lib.py", 'LABEL = "v1"\n')
    ws.write(
        "st.py",
        """
        import itertools, time

        def endless():
            for n in itertools.count():
                yield n
                time.sleep(0.002)

        def same(n):
            return n
        """,
    )
    ws.write(
        "labelled.py",
        """
        import lib

        class Label:
            def __init__(self):
                print("label", lib.LABEL, flush=True)
            def __call__(self, n):
                return [lib.LABEL, n]
        """,
    )
    ws.pipeline(
        '[pipeline]\nname = "{name}"\n[stages.src]\nfunction = "st:endless"\n'
        '[stages.plain]\nfunction = "st:same"\ninputs = ["src"]\n'
        '[stages.label]\nfunction = "labelled:Label"\ninputs = ["src"]\n'
    )
    proc = ws.start_ready()
    try:
        before = _pids(ws)
        ws.write("lib.py", 'LABEL = "v2"\n')  # only a module the label stage imports
        result = ws.run("reload", "--control", str(ws.control))
        assert (result.code, result.stdout) == (0, "changed label (code changed: label)\n")
        (record,) = wait_until(
            lambda: [r for r in read_records(ws.path / "log.jsonl") if r["event"] == "pipeline_reloaded"]
        )
        assert (record["changed"], record["code_changed"]) == (["label"], ["label"])
        assert record["unchanged"] == ["plain", "src"]
        after = wait_until(lambda: (p := _pids(ws)) and p["label"] and p["label"] != before["label"] and p)
        assert after["src"] == before["src"] and after["plain"] == before["plain"]
        wait_until(lambda: [r for r in read_records(ws.path / "log.jsonl") if r.get("line") == "label v2"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
