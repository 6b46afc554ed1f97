"""A fork server that stops answering must not stop the supervisor (issue 9): the supervisor's
wait for its reply is bounded, and a server that overstays it is killed and reported."""

from __future__ import annotations

import errno
import os
import signal

from conftest import Workspace, processes_titled, read_records

STAGES = """
import itertools, time
def ticks():
    for n in itertools.count():
        yield n
        time.sleep(0.01)
def same(n):
    return n
"""


def test_a_fork_server_that_hangs_fails_the_spawn_and_the_pipeline_instead_of_hanging_it(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstart_method = "forkserver"\n'
        '[stages.ticks]\nfunction = "st:ticks"\n'
        '[stages.same]\nfunction = "st:same"\ninputs = ["ticks"]\n'
    )
    proc = ws.start_ready()
    try:
        titles = processes_titled(f"procd: {ws.name}")
        (server,) = [pid for pid, title in titles.items() if title == f"procd: {ws.name} forkserver"]
        (same,) = [pid for pid, title in titles.items() if title.startswith(f"procd: {ws.name}/same")]
        os.kill(server, signal.SIGSTOP)  # alive, holding its socket, answering nothing
        os.kill(same, signal.SIGKILL)  # its restart asks the fork server
        assert proc.wait(timeout=30) == 1  # before: the supervisor waited in recv for ever
    finally:
        if proc.poll() is None:
            os.kill(server, signal.SIGKILL)
            proc.kill()
        proc.communicate()
    records = read_records(ws.path / "log.jsonl")
    (failed,) = [r for r in records if r["event"] == "spawn_failed"]
    assert failed["stage"] == "same" and "did not answer" in failed["error"]
    assert failed["errno"] == errno.ETIMEDOUT and f"pid {server}" in failed["error"]
    assert not os.path.exists(f"/proc/{server}")  # killed, and reaped by the supervisor
    assert records[-1]["event"] == "pipeline_stopped" and records[-1]["exit_code"] == 1
