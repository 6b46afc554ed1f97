"""The other commands: check (over every example), graph, show, init, --version, usage errors."""

from __future__ import annotations

import sqlite3
import tomllib

import pytest

from conftest import PIPELINES, Workspace
from procd import __version__, config

EXAMPLES = sorted(PIPELINES.glob("*.toml"))


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"etl.toml", "fanout.toml"}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pipeline", EXAMPLES, ids=lambda p: p.name)
def test_every_example_passes_check(ws: Workspace, pipeline, offline_pip: None) -> None:
    result = ws.run("check", str(pipeline), timeout=120)  # an example with packages builds first
    assert result.code == 0, result.stderr
    assert result.stdout.startswith(f"{pipeline}: ok (")


def test_check_reports_each_bad_file_and_exits_78(ws: Workspace) -> None:
    ws.write("good.toml", '[stages.a]\ncommand = ["true"]\n')
    ws.write("bad.toml", '[stages.a]\ncommand = ["true"]\nqueue = { batch = 0 }\n')
    result = ws.run("check", "good.toml", "bad.toml")
    assert result.code == 78
    assert result.stdout == "good.toml: ok (1 stages, 1 processes)\n"
    assert result.stderr == "bad.toml: stages.a.queue.batch: expected an integer from 1 to 1000000, got 0 (int)\n"


def test_etl_example_loads_the_database(ws: Workspace) -> None:
    # run from a directory other than pipelines/: the CSV is found through its Path option, and
    # etl.db (a plain string option) lands in the current directory
    assert ws.path != PIPELINES
    result = ws.run("run", str(PIPELINES / "etl.toml"), timeout=60)
    assert result.code == 0, result.stderr
    rejected = [line for line in result.output_lines("transform") if line.startswith("rejected line")]
    summaries = [line for line in result.output_lines("transform") if line.startswith("transform summary")]
    assert len(summaries) == 4  # one per transform process
    good = sum(int(line.split()[2]) for line in summaries)
    bad = sum(int(line.split()[4]) for line in summaries)
    assert bad == len(rejected) > 0
    assert good + bad == 3000  # every CSV row was either loaded or rejected
    with sqlite3.connect(ws.path / "etl.db") as db:
        assert db.execute("SELECT count(*) FROM customers").fetchone()[0] == good
        assert db.execute("SELECT count(DISTINCT country) FROM customers").fetchone()[0] == 9


def test_fanout_example(ws: Workspace) -> None:
    result = ws.run("run", str(PIPELINES / "fanout.toml"))
    assert result.code == 0, result.stderr
    large = sum(1 for n in range(2000) if (n * 37) % 1500 >= 1000)
    assert result.output_lines("summary") == [f"summary: 200 errors, {large} large events"]


def test_graph_prints_dot(ws: Workspace) -> None:
    result = ws.run("graph", str(PIPELINES / "fanout.toml"))
    assert result.code == 0
    assert result.stdout.startswith('digraph "fanout" {')
    for edge in ('"events" -> "errors";', '"events" -> "large";', '"errors" -> "summary";', '"large" -> "summary";'):
        assert edge in result.stdout


def test_show_fills_in_every_default(ws: Workspace) -> None:
    result = ws.run("show", str(PIPELINES / "fanout.toml"))
    assert result.code == 0
    document = tomllib.loads(result.stdout)
    assert document["pipeline"] == {
        "name": "fanout",
        "start_method": "fork",
        "stop_timeout": "10s",
        "reload_timeout": "2m",
        "state_dir": config.default_state_dir("fanout"),
        "max_processes": config.default_max_processes(),
    }
    assert document["stages"]["summary"]["dead_letter"].endswith("/fanout/summary.deadletter.jsonl")
    assert document["stages"]["summary"]["queue"] == {"maxsize": 10000, "batch": 256, "backend": "memory"}
    assert document["stages"]["errors"]["processes"] == 2


def test_init_writes_a_starter_that_runs(ws: Workspace) -> None:
    result = ws.run("init", "starter")
    assert result.code == 0
    assert (ws.path / "starter.toml").exists() and (ws.path / "starter_stages.py").exists()
    assert ws.run("check", "starter.toml").code == 0
    run = ws.run("run", "starter.toml")
    assert run.code == 0, run.stderr
    assert run.output_lines("total") == [f"sum of squares: {sum(n * n for n in range(1000))}"]
    again = ws.run("init", "starter")
    assert again.code == 1 and "already exists" in again.stderr


def test_version_help_and_usage_errors(ws: Workspace) -> None:
    assert ws.run("--version").stdout == f"procd {__version__}\n"
    help_text = ws.run("--help").stdout
    for command in ("run", "check", "graph", "show", "init"):
        assert command in help_text
    usage = ws.run("frobnicate")
    assert usage.code == 2 and "invalid choice" in usage.stderr
    assert ws.run("init", "Bad Name").code == 2


def test_the_license_file_is_the_one_pyproject_names() -> None:
    from conftest import REPO

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")
    assert "python3-venv" in (REPO / "README.md").read_text().split("## Commands")[0]  # the quick start says it
