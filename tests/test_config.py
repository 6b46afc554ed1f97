"""Pipeline files: every bad one names each problem exactly; good ones load with defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w

from procd import config, plan
from procd.errors import ConfigError
from procd.lifecycle import Restart

OK_STAGE = '[stages.a]\nfunction = "m:f"\n'

# (pipeline text, the exact lines procd must print; F stands for the file's path)
BAD = {
    "processes-not-integer": (
        OK_STAGE + 'processes = "four"\n',
        ['F: stages.a.processes: expected an integer from 1 to {MAX}, got "four" (str)'],
    ),
    "processes-zero": (
        OK_STAGE + "processes = 0\n",
        ["F: stages.a.processes: expected an integer from 1 to {MAX}, got 0 (int)"],
    ),
    "processes-bool": (
        OK_STAGE + "processes = true\n",
        ["F: stages.a.processes: expected an integer from 1 to {MAX}, got True (bool)"],
    ),
    "unknown-stage-key": (
        OK_STAGE + "proceses = 2\n",
        ['F: stages.a.proceses: unknown key; did you mean "processes"?'],
    ),
    "unknown-top-key": (
        '[pipline]\nname = "x"\n' + OK_STAGE,
        ['F: pipline: unknown key; did you mean "pipeline"?'],
    ),
    "unknown-pipeline-key": (
        '[pipeline]\nstop_timout = "1s"\n' + OK_STAGE,
        ['F: pipeline.stop_timout: unknown key; did you mean "stop_timeout"?'],
    ),
    "unknown-key-no-match": (
        OK_STAGE + "zzz = 1\n",
        [
            "F: stages.a.zzz: unknown key; valid keys are function, command, inputs, processes, options, queue, restart, strategy, max_attempts, dead_letter, redeliver, linger"
        ],
    ),
    "linger-not-a-producer": (
        OK_STAGE + '[stages.b]\nfunction = "m:g"\ninputs = ["a"]\nlinger = "5ms"\n',
        ["F: stages.b.linger: only a function producer (a function stage without inputs) lingers"],
    ),
    "linger-out-of-range": (
        OK_STAGE + 'linger = "2m"\n',
        ['F: stages.a.linger: expected a duration from 0s to 1m, got "2m" (str)'],
    ),
    "unknown-input": (
        OK_STAGE + '[stages.b]\nfunction = "m:g"\ninputs = ["aa"]\n',
        ['F: stages.b.inputs[0]: unknown stage "aa"; did you mean "a"?'],
    ),
    "self-input": (OK_STAGE + 'inputs = ["a"]\n', ["F: stages.a.inputs[0]: a stage cannot read its own output"]),
    "duplicate-input": (
        OK_STAGE + '[stages.b]\nfunction = "m:g"\ninputs = ["a", "a"]\n',
        ['F: stages.b.inputs[1]: "a" is listed twice'],
    ),
    "cycle": (
        '[stages.a]\nfunction = "m:f"\n'
        '[stages.b]\nfunction = "m:g"\ninputs = ["a", "c"]\n'
        '[stages.c]\nfunction = "m:h"\ninputs = ["b"]\n',
        ["F: stages: the stages form a cycle: b -> c -> b"],
    ),
    "both-function-and-command": (
        OK_STAGE + 'command = ["cat"]\n',
        ['F: stages.a: has both "function" and "command"; a stage runs exactly one of them'],
    ),
    "neither-function-nor-command": (
        "[stages.a]\nprocesses = 2\n",
        ['F: stages.a: needs "function" (a Python "module:attr") or "command" (an argv list)'],
    ),
    "function-not-module-attr": (
        '[stages.a]\nfunction = "justaname"\n',
        ['F: stages.a.function: expected "module:attr", such as "etl.stages:transform", got "justaname" (str)'],
    ),
    "command-shell-string": (
        '[stages.a]\ncommand = "grep x"\n',
        ['F: stages.a.command: expected a list of strings, got "grep x" (str)'],
    ),
    "command-empty": (
        "[stages.a]\ncommand = []\n",
        ["F: stages.a.command: expected a non-empty list of strings, got an empty list"],
    ),
    "bad-duration": (
        '[pipeline]\nstop_timeout = "10 sec"\n' + OK_STAGE,
        ['F: pipeline.stop_timeout: expected a duration such as "250ms", "10s" or "5m", got "10 sec" (str)'],
    ),
    "duration-number": (
        "[pipeline]\nstop_timeout = 10\n" + OK_STAGE,
        ['F: pipeline.stop_timeout: expected a duration such as "250ms", "10s" or "5m", got 10 (int)'],
    ),
    "bad-start-method": (
        '[pipeline]\nstart_method = "vfork"\n' + OK_STAGE,
        ['F: pipeline.start_method: expected one of fork, spawn, forkserver, got "vfork" (str)'],
    ),
    "bad-stage-name": (
        '[stages.Extract]\nfunction = "m:f"\n',
        ["F: stages.Extract: a stage name starts with a lower-case letter and has only a-z, 0-9, '_' and '-'"],
    ),
    "no-stages": ('[pipeline]\nname = "x"\n', ["F: stages: a pipeline needs at least one [stages.NAME] table"]),
    "queue-unknown-key": (
        OK_STAGE + "queue = { max = 5 }\n",
        ['F: stages.a.queue.max: unknown key; did you mean "maxsize"?'],
    ),
    "queue-batch-too-large": (
        OK_STAGE + "queue = { maxsize = 10, batch = 20 }\n",
        ["F: stages.a.queue.batch: must not exceed queue.maxsize (10), got 20"],
    ),
    "options-on-command": (
        '[stages.a]\ncommand = ["cat"]\noptions = { x = 1 }\n',
        ["F: stages.a.options: applies to function stages only; give a command its arguments in the argv list"],
    ),
    "options-not-table": (OK_STAGE + "options = 3\n", ["F: stages.a.options: expected a table, got 3 (int)"]),
    "toml-syntax": (
        '[stages.a]\nfunction = "m:f\n',
        ["F: not valid TOML: Illegal character '\\n' (at line 2, column 16)"],
    ),
    "restart-bad-policy": (
        OK_STAGE + 'restart = { policy = "sometimes" }\n',
        ['F: stages.a.restart.policy: expected one of no, on-failure, always, got "sometimes" (str)'],
    ),
    "restart-bad-backoff": (
        OK_STAGE + 'restart = { backoff = "1s-5s" }\n',
        ['F: stages.a.restart.backoff: expected "MIN..MAX" durations such as "100ms..30s", got "1s-5s" (str)'],
    ),
    "restart-backoff-reversed": (
        OK_STAGE + 'restart = { backoff = "5s..1s" }\n',
        ['F: stages.a.restart.backoff: the first duration must not exceed the second, got "5s..1s" (str)'],
    ),
    "bad-strategy": (
        OK_STAGE + 'strategy = "one_for_all"\n',
        ['F: stages.a.strategy: expected one of one_for_one, rest_for_one, got "one_for_all" (str)'],
    ),
    "defaults-unknown-key": (
        "[defaults]\nrestrat = {}\n" + OK_STAGE,
        ['F: defaults.restrat: unknown key; did you mean "restart"?'],
    ),
    "restart-max-negative": (
        '[defaults]\nrestart = { max = -1, within = "1 minute" }\n' + OK_STAGE,
        [
            "F: defaults.restart.max: expected an integer from 0 to 1000000, got -1 (int)",
            'F: defaults.restart.within: expected a duration such as "250ms", "10s" or "5m", got "1 minute" (str)',
        ],
    ),
    "several-problems-all-listed": (
        '[stages.a]\nfunction = "m:f"\nprocesses = -1\ninputs = ["nope"]\n[stages.b]\n',
        [
            "F: stages.a.processes: expected an integer from 1 to {MAX}, got -1 (int)",
            'F: stages.b: needs "function" (a Python "module:attr") or "command" (an argv list)',
            'F: stages.a.inputs[0]: unknown stage "nope"; stages are a, b',
        ],
    ),
    # every number and duration has its range, every name its length (issue 14)
    "toml-nested-too-deeply": (
        "x = " + "[" * 1000 + "]" * 1000 + "\n",
        ["F: not valid TOML: values are nested too deeply"],
    ),
    "toml-integer-too-long": (
        OK_STAGE + "processes = " + "9" * 5000 + "\n",
        ["F: not valid TOML: a number has more than 4300 digits"],
    ),
    "maxsize-beyond-eventfd": (
        OK_STAGE + "queue = { maxsize = 4294967296, batch = 1 }\n",
        ["F: stages.a.queue.maxsize: expected an integer from 1 to 100000000, got 4294967296 (int)"],
    ),
    "batch-too-large": (
        OK_STAGE + "queue = { maxsize = 100000000, batch = 100000000 }\n",
        ["F: stages.a.queue.batch: expected an integer from 1 to 1000000, got 100000000 (int)"],
    ),
    "max-attempts-too-large": (
        OK_STAGE + "max_attempts = 1001\n",
        ["F: stages.a.max_attempts: expected an integer from 1 to 1000, got 1001 (int)"],
    ),
    "nul-in-queue-path": (
        OK_STAGE + 'queue = { backend = "sqlite", path = "a\\u0000b" }\n',
        ['F: stages.a.queue.path: expected a file path without NUL characters, got "a\\u0000b" (str)'],
    ),
    "nul-in-state-dir": (
        '[pipeline]\nstate_dir = "s\\u0000"\n' + OK_STAGE,
        ['F: pipeline.state_dir: expected a directory path without NUL characters, got "s\\u0000" (str)'],
    ),
    "nul-in-dead-letter": (
        OK_STAGE + 'dead_letter = "\\u0000"\n',
        ['F: stages.a.dead_letter: expected a file path without NUL characters, got "\\u0000" (str)'],
    ),
    "path-too-long": (
        OK_STAGE + 'dead_letter = "/' + "d" * 5000 + '"\n',
        ["F: stages.a.dead_letter: expected a path of at most 4095 bytes, got 5001 bytes"],
    ),
    "duration-infinite": (
        '[pipeline]\nstop_timeout = "' + "9" * 400 + 's"\n' + OK_STAGE,
        ['F: pipeline.stop_timeout: expected a duration from 100ms to 24h, got "' + "9" * 47 + '…" (str)'],
    ),
    "stop-timeout-zero": (
        '[pipeline]\nstop_timeout = "0s"\n' + OK_STAGE,
        ['F: pipeline.stop_timeout: expected a duration from 100ms to 24h, got "0s" (str)'],
    ),
    "restart-within-zero": (
        OK_STAGE + 'restart = { within = "0s" }\n',
        ['F: stages.a.restart.within: expected a duration from 1s to 24h, got "0s" (str)'],
    ),
    "backoff-too-long": (
        OK_STAGE + 'restart = { backoff = "1s..2h" }\n',
        ['F: stages.a.restart.backoff: expected durations from 0s to 1h, got "1s..2h" (str)'],
    ),
    "duration-unicode-digits": (
        '[pipeline]\nstop_timeout = "٣s"\n' + OK_STAGE,
        ['F: pipeline.stop_timeout: expected a duration such as "250ms", "10s" or "5m", got "٣s" (str)'],
    ),
    "processes-huge": (
        OK_STAGE + "processes = 9223372036854775807\n",
        ["F: stages.a.processes: expected an integer from 1 to {MAX}, got 9223372036854775807 (int)"],
    ),
    "processes-over-the-ceiling-in-all": (
        "[pipeline]\nmax_processes = 4\n" + OK_STAGE + "processes = 3\n"
        '[stages.b]\nfunction = "m:g"\ninputs = ["a"]\nprocesses = 2\n',
        [
            "F: stages: the stages run 5 processes in all, more than pipeline.max_processes (4); "
            "raise pipeline.max_processes to run more"
        ],
    ),
    "max-processes-range": (
        "[pipeline]\nmax_processes = 0\n" + OK_STAGE,
        ["F: pipeline.max_processes: expected an integer from 1 to 100000, got 0 (int)"],
    ),
    "metrics-host-name": (
        '[pipeline]\nmetrics = "host:99"\n' + OK_STAGE,
        [
            'F: pipeline.metrics: expected "HOST:PORT" or "PORT" with an IP address (or localhost) and a port '
            'from 1024 to 65535, such as "127.0.0.1:9464", got "host:99" (str)'
        ],
    ),
    "metrics-low-port": (
        '[pipeline]\nmetrics = "127.0.0.1:99"\n' + OK_STAGE,
        [
            'F: pipeline.metrics: expected "HOST:PORT" or "PORT" with an IP address (or localhost) and a port '
            'from 1024 to 65535, such as "127.0.0.1:9464", got "127.0.0.1:99" (str)'
        ],
    ),
    "pipeline-name-too-long": (
        '[pipeline]\nname = "' + "p" * 5000 + '"\n' + OK_STAGE,
        ["F: pipeline.name: expected at most 64 characters, got 5000"],
    ),
    "stage-name-too-long": (
        "[stages." + "s" * 100 + ']\nfunction = "m:f"\n',
        ["F: stages." + "s" * 100 + ": a stage name has at most 64 characters, got 100"],
    ),
    "function-ref-too-long": (
        '[stages.a]\nfunction = "m:' + "f" * 300 + '"\n',
        ["F: stages.a.function: expected at most 256 characters, got 302"],
    ),
    "command-too-long": (
        "[stages.a]\ncommand = [" + ", ".join(['"' + "a" * 99 + '"'] * 20000) + "]\n",
        ["F: stages.a.command: expected at most 1048576 bytes of arguments in all, got 2000000"],
    ),
    "nul-in-command": (
        '[stages.a]\ncommand = ["cat", "a\\u0000"]\n',
        ['F: stages.a.command[1]: expected an argument without NUL characters, got "a\\u0000" (str)'],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pipeline_lists_every_problem_exactly(case: str, tmp_path: Path) -> None:
    text, expected = BAD[case]
    file = tmp_path / f"{case}.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load_pipeline(file)
    limit = str(config.default_max_processes())
    assert info.value.lines() == [line.replace("F", str(file), 1).replace("{MAX}", limit) for line in expected]


def test_restart_defaults_apply_key_by_key(tmp_path: Path) -> None:
    file = tmp_path / "r.toml"
    file.write_text(
        '[defaults]\nrestart = { policy = "on-failure", max = 3, backoff = "10ms..1s" }\n'
        + OK_STAGE
        + 'restart = { max = 7 }\n[stages.b]\nfunction = "m:g"\ninputs = ["a"]\n'
    )
    spec = config.load_pipeline(file)
    assert spec.stage("a").restart == config.RestartSpec(Restart.ON_FAILURE, 7, 60.0, 0.01, 1.0)
    assert spec.stage("b").restart == config.RestartSpec(Restart.ON_FAILURE, 3, 60.0, 0.01, 1.0)


def test_state_paths_are_relative_to_the_pipeline_file(tmp_path: Path) -> None:
    file = tmp_path / "s.toml"
    file.write_text(
        '[pipeline]\nstate_dir = "state"\n' + OK_STAGE + '[stages.b]\nfunction = "m:g"\ndead_letter = "dl/b.jsonl"\n'
    )
    spec = config.load_pipeline(file)
    assert spec.state_dir == str(tmp_path / "state")
    assert spec.stage("a").dead_letter == str(tmp_path / "state" / "a.deadletter.jsonl")
    assert spec.stage("b").dead_letter == str(tmp_path / "dl" / "b.jsonl")
    assert spec.stage("a").max_attempts == 3


def test_restart_defaults_to_on_failure(tmp_path: Path) -> None:
    file = tmp_path / "r.toml"
    file.write_text(OK_STAGE)
    assert config.load_pipeline(file).stage("a").restart == config.RestartSpec(Restart.ON_FAILURE, 5, 60.0, 0.1, 30.0)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load_pipeline(tmp_path / "absent.toml")
    assert info.value.lines() == [f"{tmp_path / 'absent.toml'}: cannot read the file: No such file or directory"]


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    file = tmp_path / "orders.toml"
    file.write_text(OK_STAGE + '[stages.b]\ncommand = ["cat"]\ninputs = ["a"]\n')
    spec = config.load_pipeline(file)
    assert spec.name == "orders"
    assert spec.start_method == "fork"
    assert spec.stop_timeout_s == 10.0
    b = spec.stage("b")
    assert (b.command, b.inputs, b.processes) == (("cat",), ("a",), 1)
    assert b.queue == config.QueueSpec(maxsize=10_000, batch=256)
    assert b.queue.slots == 40
    assert spec.stage("a").is_producer and not b.is_producer


@pytest.mark.parametrize(
    ("queue", "batch"),
    [
        ('backend = "redis", url = "redis://h/0"', 1024),  # a round trip per batch: larger ones
        ('backend = "redis", url = "redis://h/0", maxsize = 500', 256),  # not above a small bound
        ('backend = "redis", url = "redis://h/0", batch = 64', 64),
        ('backend = "sqlite"', 256),
        ("maxsize = 5000", 256),
    ],
)
def test_the_default_batch_depends_on_the_backend(queue: str, batch: int, tmp_path: Path) -> None:
    file = tmp_path / "orders.toml"
    file.write_text(OK_STAGE + f'[stages.b]\nfunction = "m:f"\ninputs = ["a"]\nqueue = {{ {queue} }}\n')
    assert config.load_pipeline(file).stage("b").queue.batch == batch


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == seconds
    assert config.parse_duration(config.format_duration(seconds)) == seconds


def test_show_writes_back_a_file_that_loads_to_the_same_spec(tmp_path: Path) -> None:
    file = tmp_path / "p.toml"
    file.write_text(
        '[pipeline]\nstop_timeout = "250ms"\n' + OK_STAGE + "options = { n = 3 }\n"
        '[stages.b]\ncommand = ["cat"]\ninputs = ["a"]\nprocesses = 2\n'
    )
    spec = config.load_pipeline(file)
    again = tmp_path / "again.toml"
    again.write_text(tomli_w.dumps(config.as_document(spec)))
    document = tomllib.loads(again.read_text())
    state = config.default_state_dir("p")
    assert document["pipeline"] == {
        "name": "p",
        "start_method": "fork",
        "stop_timeout": "250ms",
        "reload_timeout": "2m",
        "state_dir": state,
        "max_processes": config.default_max_processes(),
    }
    assert document["stages"]["b"]["dead_letter"] == f"{state}/b.deadletter.jsonl"
    assert document["stages"]["b"]["queue"] == {"maxsize": 10_000, "batch": 256, "backend": "memory"}
    reloaded = config.load_pipeline(again)
    assert reloaded.stages == spec.stages and reloaded.stop_timeout_s == spec.stop_timeout_s


def test_order_and_graph(tmp_path: Path) -> None:
    file = tmp_path / "g.toml"
    file.write_text(
        '[stages.sink]\nfunction = "m:s"\ninputs = ["left", "right"]\n'
        '[stages.left]\nfunction = "m:l"\ninputs = ["src"]\n'
        '[stages.right]\ncommand = ["cat"]\ninputs = ["src"]\n'
        '[stages.src]\nfunction = "m:p"\n'
    )
    spec = config.load_pipeline(file)
    assert [s.name for s in plan.topological_order(spec)] == ["src", "left", "right", "sink"]
    assert plan.outputs(spec, spec.stage("src")) == ("left", "right")
    dot = plan.to_dot(spec)
    assert dot.startswith('digraph "g" {')
    assert '"src" -> "left";' in dot and '"right" -> "sink";' in dot and '"left" -> "sink";' in dot
    assert '[shape=component, label="right\\ncat\\nx1"]' in dot


def _spec(tmp_path: Path, name: str, text: str) -> config.PipelineSpec:
    file = tmp_path / f"{name}.toml"
    file.write_text('[pipeline]\nname = "p"\n' + text)
    return config.load_pipeline(file)


def test_reload_plan_counts_wiring_as_configuration(tmp_path: Path) -> None:
    base = (
        '[stages.src]\nfunction = "m:p"\n'
        '[stages.a]\nfunction = "m:a"\ninputs = ["src"]\n'
        '[stages.b]\nfunction = "m:b"\ninputs = ["a"]\n'
        '[stages.gone]\nfunction = "m:g"\ninputs = ["src"]\n'
    )
    old = _spec(tmp_path, "old", base)
    new = _spec(
        tmp_path,
        "new",
        base.replace('[stages.gone]\nfunction = "m:g"\ninputs = ["src"]\n', "").replace(
            'function = "m:b"\ninputs = ["a"]\n',
            'function = "m:b"\ninputs = ["a"]\nqueue = { maxsize = 20, batch = 10 }\n',
        )
        + '[stages.fresh]\ncommand = ["cat"]\ninputs = ["b"]\n',
    )
    diff = plan.reload_plan(old, new, finished=set())
    assert diff.removed == {"gone"} and diff.added == {"fresh"}
    assert diff.replaced_queues == {"b"}  # b's queue changed: a, which writes to it, restarts too
    assert diff.changed == {"src", "a", "b"}  # src lost a reader; b gained one
    assert diff.unchanged == frozenset()
    assert plan.reload_plan(old, old, finished=set()).unchanged == {"src", "a", "b", "gone"}
    finished = plan.reload_plan(old, new, finished={"src"})
    assert finished.finished == {"src"} and "src" not in finished.changed
