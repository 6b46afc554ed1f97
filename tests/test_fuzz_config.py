"""Property-based fuzzing of the pipeline loader and of `procd check` (issue 14): whatever the
document and whatever the stage code does, the loader returns a spec or raises ConfigError, and
`procd check` exits 0 or 78 without a traceback. Bounded: a few hundred examples, each with a
deadline, in a few seconds."""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procd import cli, config, plan
from procd.errors import ConfigError

FUZZ = settings(
    max_examples=200,
    deadline=5000,  # ms per example (generous on a loaded machine: a check forks and imports)
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

MODULES = {
    "st.py": """
import os
from pathlib import Path

def gen(count=3):
    yield from range(count)

def sharded(shard, count=3):
    yield from range(shard.index, count, shard.count)

def fn(item, factor=1):
    return item

class Sink:
    def __init__(self, path: Path = Path("x"), *, mode="w"):
        self.path = path
    def __call__(self, item):
        pass

def __getattr__(name):
    if name == "boom":
        raise RuntimeError("boom")
    if name == "leave":
        raise SystemExit(2)
    if name == "interrupt":
        raise KeyboardInterrupt
    raise AttributeError(name)
""",
    "syntax.py": "def f(:\n",
    "leaves.py": "raise SystemExit(3)\n",
    "interrupts.py": "raise KeyboardInterrupt\n",
    "hard_exit.py": "import os\nos._exit(4)\n",
    "fails.py": "import nosuchthing_procd\n",
}

REFS = [
    "st:gen", "st:sharded", "st:fn", "st:Sink", "st:boom", "st:leave", "st:interrupt", "st:absent",
    "syntax:f", "leaves:f", "interrupts:f", "hard_exit:f", "fails:f", "nosuchmodule:f", "os:sep",
]  # fmt: skip

NAMES = st.sampled_from(["a", "b", "c", "src", "Bad", "x" * 70, ""]) | st.text(max_size=8)
SCALARS = (
    st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([0, 1, 2, 4, 2**32, 2**63 - 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.text(max_size=12)
    | st.sampled_from(["", "\0", "a\0b", "x" * 5000, "٣s"])
)
DURATIONS = st.sampled_from(
    ["0s", "1ms", "250ms", "10s", "5m", "1h", "25h", "1.5s", "9" * 400 + "s", "10 sec", "-1s", "1s..2s", "5s..1s"]
) | st.text(max_size=10)
VALUES = st.recursive(
    SCALARS | DURATIONS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _maybe(key: str, strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.just({}), strategy.map(lambda value: {key: value}))


def _table(**fields: st.SearchStrategy) -> st.SearchStrategy:
    parts = [_maybe(key, strategy | VALUES) for key, strategy in fields.items()]
    return st.tuples(*parts).map(lambda dicts: {k: v for d in dicts for k, v in d.items()})


STAGE = _table(
    function=st.sampled_from(REFS) | st.text(max_size=20),
    command=st.sampled_from([["cat"], ["true"], ["no-such-program-procd"], ["./absent"], [""], ["a\0"], []]),
    inputs=st.lists(NAMES, max_size=3),
    processes=st.integers(min_value=-2, max_value=10**20),
    options=st.dictionaries(st.sampled_from(["count", "cuont", "factor", "path", "mode", "shard", "item"]), VALUES),
    queue=_table(
        maxsize=st.integers(min_value=-1, max_value=2**40),
        batch=st.integers(min_value=-1, max_value=2**40),
        backend=st.sampled_from(["memory", "sqlite", "redis"]),
        path=st.sampled_from(["q.sqlite", "\0", "/" + "d" * 5000]),
    ),
    restart=_table(
        policy=st.sampled_from(["no", "on-failure", "always", "sometimes"]),
        max=st.integers(min_value=-1, max_value=10**12),
        within=DURATIONS,
        backoff=DURATIONS,
    ),
    strategy=st.sampled_from(["one_for_one", "rest_for_one", "one_for_all"]),
    max_attempts=st.integers(min_value=-1, max_value=10**6),
    dead_letter=st.sampled_from(["dl.jsonl", "\0", "", "/" + "d" * 5000]),
    redeliver=st.booleans(),
)
DOCUMENT = _table(
    pipeline=_table(
        name=NAMES | st.just("p" * 5000),
        start_method=st.sampled_from(["fork", "spawn", "forkserver", "vfork"]),
        stop_timeout=DURATIONS,
        state_dir=st.sampled_from(["state", "", "s\0", "/" + "d" * 5000]),
        metrics=st.sampled_from(["9464", "127.0.0.1:9464", "host:99", "[::1]:9464", "localhost:http", ":"]),
        max_processes=st.integers(min_value=-1, max_value=10**9),
    ),
    defaults=_table(restart=VALUES, strategy=st.sampled_from(["one_for_one", "rest_for_one", "x"])),
    stages=st.dictionaries(NAMES, STAGE | VALUES, max_size=4),
) | st.dictionaries(st.text(max_size=8), VALUES, max_size=3)
DEPTHS = st.sampled_from([1, 100, 400, 1000, 3000]) | st.integers(min_value=0, max_value=3000)
NESTED = DEPTHS.map(lambda n: "x = " + "[" * n + "]" * n + "\n") | DEPTHS.map(
    lambda n: "x = " + "{a = " * n + "}" * n + "\n"
)


def _text(document: dict) -> str:
    return tomli_w.dumps(document)


def _assert_loads_or_config_error(file: Path) -> None:
    try:
        spec = config.load_pipeline(file)
    except ConfigError as error:
        assert error.problems and all(line.startswith(f"{file}: ") for line in error.lines())
        return
    # a spec that loads can be shown and drawn, and keeps every value in its range
    tomli_w.dumps(config.as_document(spec))
    plan.to_dot(spec)
    assert 1 <= spec.process_ceiling <= config.MAX_PROCESSES_LIMIT
    assert sum(s.processes for s in spec.stages) <= spec.process_ceiling
    assert math.isfinite(spec.stop_timeout_s) and spec.stop_timeout_s > 0
    for stage in spec.stages:
        assert math.isfinite(stage.restart.within_s) and stage.restart.within_s > 0
        assert stage.restart.backoff_max_s <= config.BACKOFF_RANGE_S[1]
        assert stage.queue.maxsize <= config.MAXSIZE_RANGE[1] and stage.queue.slots < 2**32
        assert "\0" not in stage.dead_letter and len(stage.name) <= config.MAX_NAME


@FUZZ
@given(document=DOCUMENT)
def test_the_loader_returns_a_spec_or_a_config_error(tmp_path: Path, document: dict) -> None:
    file = tmp_path / "fuzz.toml"
    file.write_text(_text(document))
    _assert_loads_or_config_error(file)


@FUZZ
@given(text=NESTED | st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_the_loader_survives_any_text(tmp_path: Path, text: str) -> None:
    file = tmp_path / "fuzz.toml"
    file.write_bytes(text.encode("utf-8", "surrogatepass"))
    _assert_loads_or_config_error(file)


@settings(FUZZ, max_examples=150)
@given(document=DOCUMENT)
def test_check_exits_0_or_78_without_a_traceback(tmp_path: Path, document: dict) -> None:
    for name, text in MODULES.items():
        if not (tmp_path / name).exists():
            (tmp_path / name).write_text(text)
    file = tmp_path / "fuzz.toml"
    file.write_text(_text(document))
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # programs with a slash are looked up from here, as exec would
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["check", str(file)])
    finally:
        os.chdir(cwd)
    assert code in (0, 78)
    if code == 0:
        assert out.getvalue().startswith(f"{file}: ok (")
    else:
        assert err.getvalue() and all(line.startswith(f"{file}: ") for line in err.getvalue().splitlines())
