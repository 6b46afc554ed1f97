"""`procd scale` within limits: a ceiling on processes, paced starts, and producers that only
grow if they can split their work (issue 13 items 1 and 4, issue 14 item 12)."""

from __future__ import annotations

import json

from conftest import Workspace, parse_records, wait_until

STAGES = """
import itertools, time

def endless():
    for n in itertools.count():
        yield n
        time.sleep(0.01)

def sharded(shard):
    print("shard", shard.index, shard.count, flush=True)
    index, count = shard
    for n in itertools.count(index, count):
        yield n
        time.sleep(0.01)

def same(n):
    return n
"""


def _start(ws: Workspace, pipeline: str):
    ws.write("st.py", STAGES)
    ws.pipeline('[pipeline]\nname = "{name}"\n' + pipeline)
    return ws.start_ready()


def _ask(ws: Workspace, *args: str):
    return ws.run(*args, "--control", str(ws.control))


def _workers(ws: Workspace, stage: str, *, up: bool = False) -> list[dict]:
    """The stage's workers; with ``up``, only those whose process has started its work."""
    reply = json.loads(_ask(ws, "status", "--json").stdout)
    (found,) = [s for s in reply["stages"] if s["name"] == stage]
    return [w for w in found["workers"] if not up or w["state"] in ("running", "blocked")]


def _stop(proc) -> None:
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def _start_work(ws: Workspace, max_processes: int, processes: int):
    """An endless producer feeding the stage "work"."""
    return _start(
        ws,
        f"max_processes = {max_processes}\n"
        '[stages.src]\nfunction = "st:endless"\n'
        f'[stages.work]\nfunction = "st:same"\ninputs = ["src"]\nprocesses = {processes}\n',
    )


def test_scale_beyond_the_ceiling_is_an_error_at_once(ws: Workspace) -> None:
    proc = _start_work(ws, max_processes=4, processes=2)
    try:
        huge = _ask(ws, "scale", ws.name, "work=" + "9" * 50)
        assert huge.code == 1
        assert huge.stderr == (
            "procd scale: processes must be an integer from 1 to 4 (pipeline.max_processes), got 999999999999…\n"
        )
        over = _ask(ws, "scale", ws.name, "work=4")
        assert over.code == 1
        assert over.stderr == (
            "procd scale: stage work cannot have 4 processes: the pipeline would run 5, more than "
            "pipeline.max_processes (4); raise it in the file and reload\n"
        )
        absurd = _ask(ws, "scale", ws.name, "work=" + "9" * 5000)
        assert absurd.code == 2 and "Traceback" not in absurd.stderr
        assert len(_workers(ws, "work")) == 2  # nothing changed, and the loop still answers
        up = _ask(ws, "scale", ws.name, "work=3")
        assert (up.code, up.stdout) == (0, "work: 3 processes (started [2], retiring [])\n")
        wait_until(lambda: len(_workers(ws, "work", up=True)) == 3)
    finally:
        _stop(proc)


def test_a_large_scale_starts_its_processes_at_a_pace(ws: Workspace) -> None:
    proc = _start_work(ws, max_processes=40, processes=1)
    try:
        up = _ask(ws, "scale", ws.name, "work=30")
        assert up.code == 0, up.stderr
        # 16 at once (SPAWN_BURST), the other 13 as the rate allows
        assert up.stdout == f"work: 30 processes (started {list(range(1, 30))}, retiring [], 13 waiting to start)\n"
        wait_until(lambda: len(_workers(ws, "work", up=True)) == 30, timeout=30)
    finally:
        _stop(proc)


def test_a_producer_grows_only_if_it_takes_a_shard(ws: Workspace) -> None:
    proc = _start(
        ws,
        '[stages.plain]\nfunction = "st:endless"\n'
        '[stages.split]\nfunction = "st:sharded"\n'
        '[stages.sink]\nfunction = "st:same"\ninputs = ["plain", "split"]\n',
    )
    try:
        refused = _ask(ws, "scale", ws.name, "plain=2")
        assert refused.code == 1
        assert refused.stderr == (
            "procd scale: stage plain is a producer: another process would yield every item again; "
            'a producer that accepts a "shard" parameter and keeps no checkpoint can be scaled (see the README)\n'
        )
        old = [w["pid"] for w in _workers(ws, "split")]
        grown = _ask(ws, "scale", ws.name, "split=3")
        assert (grown.code, grown.stdout) == (0, "split: 3 processes (started [0, 1, 2], retiring [0])\n")
        wait_until(lambda: len(p := [w["pid"] for w in _workers(ws, "split", up=True)]) == 3 and not set(p) & set(old))
    finally:
        _stop(proc)
    records = parse_records((ws.path / "log.jsonl").read_text())
    shards = [r["line"] for r in records if r["event"] == "worker_output" and r["stage"] == "split"]
    assert sorted(shards) == ["shard 0 1", "shard 0 3", "shard 1 3", "shard 2 3"]
    (scaled,) = [r for r in records if r["event"] == "stage_scaled"]
    assert (scaled["stage"], scaled["processes_to"], scaled["resharded"]) == ("split", 3, True)
