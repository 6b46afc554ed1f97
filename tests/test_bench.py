"""The benchmarks still run: ``bench/all.py --quick`` measures every row of issue 12's table and
leaves no process behind. Figures are not checked (timings are for benchmarks, not tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

ROWS = (
    "throughput_classic",
    "throughput_batched",
    "two_by_two",
    "cpu_per_item",
    "blocked_producer",
    "latency_direct",
    "latency_middle",
    "restart_command",
    "restart_function",
    "startup_run",
    "startup_version",
    "startup_status",
    "startup_check",
    "idle_memory",
    "cpu_bound",
    "json_lines_cat",
)


def in_session(session: int) -> list[int]:
    """Live processes of session ``session`` (procd and the benches never start a new one)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session and fields[0] != "Z":
                found.append(int(entry))
    return found


@pytest.mark.timeout(300)
def test_quick_bench_measures_every_row_and_leaves_nothing_behind() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "all.py"), "--quick"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # every process the benches start is in this session
    )
    try:
        stdout, stderr = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert re.search(r"^machine: \d+ cores, .+; at start: load average [\d.]+", stdout, re.M), stdout
    assert re.search(r"^at end: load average [\d.]+", stdout, re.M), stdout
    summary = dict(pair.split("=") for pair in stdout.rsplit("rows: ", 1)[1].split())
    assert sorted(summary) == sorted(ROWS), summary
    for key in ROWS:
        assert float(summary[key]) > 0, f"{key} measured nothing: {summary[key]}"
    table = [line for line in stdout.splitlines() if line.count(" | ") >= 5]
    assert len(table) == len(ROWS) + 1, stdout  # the head line and one line per row
    for line in table[1:]:
        assert re.search(r"\d", line.split(" | ")[1]), f"no figure in {line!r}"
    left = in_session(proc.pid)
    assert not left, f"processes left behind: {left}"
