"""Pipeline files: TOML in, frozen specs out, with every problem located by file and key path.

Pure: reads one file and imports nothing of the user's (importing stage code is ``callables``'s
job). Every problem is collected before any is reported; units are converted here, once, so no
child ever parses a duration.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import field, replace
from typing import Any

from procd.errors import ConfigError, Problem
from procd.frozen import frozen_dataclass
from procd.restarts import Restart

START_METHODS = ("fork", "spawn", "forkserver")
DEFAULT_STOP_TIMEOUT_S = 10.0
DEFAULT_QUEUE_MAXSIZE = 10_000
DEFAULT_QUEUE_BATCH = 256
# A Redis queue costs a round trip per batch at each end, not a system call: larger batches
# (bench/README.md, redis section), unless the bound is smaller.
DEFAULT_REDIS_BATCH = 1024

# Every number, duration, name and path has its range: a value outside it is a problem at load
# time, never an OverflowError, a MemoryError or an endless wait once processes run.
MAX_NAME = 64  # a pipeline or stage name: process titles, socket paths, record keys
MAX_FUNCTION_REF = 256
MAX_PATH_BYTES = 4095  # PATH_MAX less the terminating NUL
MAX_ARGUMENT_BYTES = 131_072  # MAX_ARG_STRLEN: the kernel's limit on one argv string
MAX_COMMAND_BYTES = 1 << 20  # half of the usual ARG_MAX, the rest for the environment
MAX_FILE_BYTES = 16 << 20  # a pipeline file larger than this is not one
MAX_PROCESSES_LIMIT = 100_000  # the highest pipeline.max_processes may go
PROCESSES_PER_CPU = 32  # the default ceiling: this many processes per CPU procd may use
MAXSIZE_RANGE = (1, 100_000_000)  # a queue bound, in items (an eventfd counts its batches)
BATCH_RANGE = (1, 1_000_000)
MAX_ATTEMPTS_RANGE = (1, 1000)
RESTART_MAX_RANGE = (0, 1_000_000)
STOP_TIMEOUT_RANGE_S = (0.1, 86_400.0)  # "0s" would SIGKILL every stop
RELOAD_TIMEOUT_RANGE_S = (0.1, 3600.0)  # commands.RELOAD_REPLY_S waits longer than the longest
DEFAULT_RELOAD_TIMEOUT_S = 120.0  # how long a reload's check of the stage code may take
WITHIN_RANGE_S = (1.0, 86_400.0)  # "0s" would make a stage never fatal
BACKOFF_RANGE_S = (0.0, 3600.0)
METRICS_PORTS = (1024, 65_535)

_STAGE_NAME = re.compile(r"[a-z][a-z0-9_-]*\Z")
_PIPELINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_FUNCTION_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)\Z")  # ASCII digits only
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_SHOWN = 48  # characters of a wrong value quoted in a message

_TOP_KEYS = ("pipeline", "defaults", "stages")
_PIPELINE_KEYS = (
    "name",
    "start_method",
    "stop_timeout",
    "reload_timeout",
    "state_dir",
    "metrics",
    "max_processes",
    "packages",
    "requirements",
)
_DEFAULTS_KEYS = ("restart", "strategy", "queue")
_STAGE_KEYS = (
    "function",
    "command",
    "inputs",
    "processes",
    "options",
    "queue",
    "restart",
    "strategy",
    "max_attempts",
    "dead_letter",
    "redeliver",
    "linger",
)
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LINGER_S = 0.001
LINGER_RANGE_S = (0.0, 60.0)  # how long a function producer holds a part-filled batch
STRATEGIES = ("one_for_one", "rest_for_one")
_QUEUE_KEYS = ("maxsize", "batch", "backend", "path", "url", "stream", "claim_after", "codec")
BACKENDS = ("memory", "sqlite", "redis")
_REDIS_KEYS = ("url", "stream", "claim_after", "codec")
CODECS = ("json", "pickle")
REDIS_SCHEMES = ("redis", "rediss", "unix")
CLAIM_AFTER_RANGE_S = (1.0, 86_400.0)
MAX_STREAM_NAME = 256
_RESTART_KEYS = ("policy", "max", "within", "backoff")
_POLICIES = tuple(p.value for p in Restart)


@frozen_dataclass(frozen=True)
class QueueSpec:
    """A stage's input queue: its bound in items and the number of items a message carries."""

    maxsize: int = DEFAULT_QUEUE_MAXSIZE
    batch: int = DEFAULT_QUEUE_BATCH
    backend: str = "memory"
    path: str | None = None  # the SQLite file of a durable queue (absolute once loaded)
    # backend = "redis": the server, the stream (procd:<pipeline>:<stage> unless given), how long an
    # entry may stay with a silent consumer before another takes it, and how items are encoded
    url: str | None = None
    stream: str | None = None
    claim_after_s: float = 30.0
    codec: str = "pickle"
    upstream: tuple[str, ...] = ()  # the stages that write to it (the end of stream waits for each)

    @property
    def slots(self) -> int:
        """The bound counted in messages (whole batches)."""
        return max(1, math.ceil(self.maxsize / self.batch))


@frozen_dataclass(frozen=True)
class RestartSpec:
    """When a stage's worker is started again, how soon, and how often before the stage is fatal."""

    policy: Restart = Restart.ON_FAILURE
    max: int = 5
    within_s: float = 60.0
    backoff_min_s: float = 0.1
    backoff_max_s: float = 30.0


@frozen_dataclass(frozen=True)
class StageSpec:
    """One stage, every default filled in."""

    name: str
    function: str | None = None
    command: tuple[str, ...] | None = None
    inputs: tuple[str, ...] = ()
    processes: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)
    queue: QueueSpec = QueueSpec()
    restart: RestartSpec = RestartSpec()
    strategy: str = "one_for_one"
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    dead_letter: str = ""  # an absolute path once loaded
    redeliver: bool = True  # track the batch in hand so a crash cannot lose it
    linger_s: float = DEFAULT_LINGER_S  # a function producer sends a part-filled batch this long after its first item
    # Found by checking the stage's code (``callables.load_and_check``), not read from the file:
    code_hash: str = ""  # a digest of the modules it imports from the pipeline's directory
    shardable: bool = False  # a producer that accepts ``shard``, so may run in several processes

    @property
    def is_producer(self) -> bool:
        """True for a stage with no inputs."""
        return not self.inputs


@frozen_dataclass(frozen=True)
class PipelineSpec:
    """A whole pipeline file, validated."""

    name: str
    file: str
    start_method: str = "fork"
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    reload_timeout_s: float = DEFAULT_RELOAD_TIMEOUT_S  # a reload whose check takes longer fails
    state_dir: str = ""  # an absolute path once loaded
    metrics: tuple[str, int] | None = None  # where the Prometheus endpoint listens
    stages: tuple[StageSpec, ...] = ()
    max_processes: int = 0  # the ceiling on live workers (file, scale, reload); 0: the machine's default
    packages: tuple[str, ...] = ()  # project directories (absolute once loaded) built into the environment
    requirements: tuple[str, ...] = ()  # more distributions for the environment, as pip takes them
    here: frozenset[str] | None = None  # the stages this host runs (``procd run --stages``); None: all

    def runs_here(self, name: str) -> bool:
        """Whether stage ``name`` runs on this host (its other hosts run the same file)."""
        return self.here is None or name in self.here

    @property
    def process_ceiling(self) -> int:
        """The most worker processes this pipeline may run at once."""
        return self.max_processes or default_max_processes()

    @property
    def has_environment(self) -> bool:
        """True when the pipeline runs in its own virtual environment (``environment.py``)."""
        return bool(self.packages or self.requirements)

    @functools.cached_property
    def base_dir(self) -> str:
        """The pipeline file's directory: first on ``sys.path`` for function stages. Resolved once
        (a ``stat`` per path component and ``getcwd``): every worker's start reads it."""
        return os.path.dirname(os.path.realpath(self.file))

    def stage(self, name: str) -> StageSpec:
        """Return the stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def readers(self, name: str) -> tuple[StageSpec, ...]:
        """Return the stages that list ``name`` among their inputs (its fan-out)."""
        return tuple(s for s in self.stages if name in s.inputs)


def select_stages(spec: PipelineSpec, names: Sequence[str]) -> tuple[PipelineSpec, list[Problem]]:
    """``spec`` running only the stages ``names`` on this host (``procd run --stages``).

    Every queue between a stage that runs here and one that runs elsewhere must be one both
    hosts reach: ``backend = "redis"``. Each problem names the stage and why.
    """
    problems = []
    known = [s.name for s in spec.stages]
    for name in names:
        if name not in known:
            close = close_matches(name, known)
            hint = f'; did you mean "{close[0]}"?' if close else f"; stages are {', '.join(known)}"
            problems.append(Problem("--stages", f"unknown stage {_quoted(name[:MAX_NAME], ascii_only=True)}{hint}"))
    here = frozenset(names)
    for stage in spec.stages:
        for upstream in stage.inputs:
            if (stage.name in here) == (upstream in here) or stage.queue.backend == "redis":
                continue
            away, local = (stage.name, upstream) if upstream in here else (upstream, stage.name)
            problems.append(
                Problem(
                    f"stages.{stage.name}.queue.backend",
                    f"{away} does not run on this host (--stages) but {local} does, so the queue between "
                    f'them (the input of {stage.name}) must be one both reach: backend = "redis", '
                    f'not "{stage.queue.backend}"',
                )
            )
    if not names:
        problems.append(Problem("--stages", "expected at least one stage name"))
    return replace(spec, here=here), problems


def default_state_dir(pipeline: str) -> str:
    """Where dead letters and durable queues live unless the file says otherwise:
    ``$STATE_DIRECTORY`` (set by systemd's StateDirectory=), ``/var/lib/procd/NAME`` for root,
    else ``$XDG_STATE_HOME/procd/NAME`` (``~/.local/state/procd/NAME``)."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.path.join(os.environ["STATE_DIRECTORY"].split(":")[0], pipeline)
    if os.geteuid() == 0:
        return os.path.join("/var/lib/procd", pipeline)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "procd", pipeline)


def default_max_processes() -> int:
    """The default ceiling on a pipeline's processes: ``PROCESSES_PER_CPU`` per CPU this process
    may run on (its affinity mask, as a cgroup or ``taskset`` leaves it)."""
    return PROCESSES_PER_CPU * len(os.sched_getaffinity(0))


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_duration(text: str) -> float:
    """Convert ``"250ms"``, ``"10s"``, ``"5m"`` or ``"1h"`` to seconds.

    The result may be huge (400 nines are ``inf``): every caller checks it against a range.

    Raises:
        ValueError: ``text`` is not a number followed by one of ms, s, m, h.
    """
    match = _DURATION.match(text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def format_duration(seconds: float) -> str:
    """The inverse of ``parse_duration``, in the largest unit that keeps the value whole."""
    if seconds == 0:
        return "0s"
    for unit in ("h", "m", "s"):
        value = seconds / _UNIT_S[unit]
        if value >= 1 and value == int(value):
            return f"{int(value)}{unit}"
    return f"{round(seconds * 1000, 3):g}ms"


def close_matches(word: str, choices: Sequence[str]) -> list[str]:
    """The one closest valid choice, for a did-you-mean (difflib is imported only on error)."""
    import difflib

    return difflib.get_close_matches(word, choices, n=1)


def _quoted(text: str, *, ascii_only: bool = False) -> str:
    """``text`` as a JSON string, for a message (``json`` is imported only on error: ``procd check``
    of a valid file has no other use for it)."""
    import json

    return json.dumps(text, ensure_ascii=ascii_only)


def describe(value: object) -> str:
    """Describe a wrong value the way every message does: ``"four" (str)``; long values are cut,
    control characters escaped, and nesting shown only a few levels deep."""
    if isinstance(value, str):
        cut = value if len(value) <= _MAX_SHOWN else value[: _MAX_SHOWN - 1] + "…"
        shown = _quoted(cut)
    else:
        import reprlib  # only on error

        short = reprlib.Repr()
        short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, _MAX_SHOWN, _MAX_SHOWN, _MAX_SHOWN
        shown = short.repr(value)
    return f"got {shown} ({type(value).__name__})"


class _Checker:
    """Collects problems while it walks the document."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def unknown_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key in allowed:
                continue
            close = close_matches(key, allowed)
            hint = f'; did you mean "{close[0]}"?' if close else f"; valid keys are {', '.join(allowed)}"
            shown = key if len(key) <= MAX_NAME else key[: MAX_NAME - 1] + "…"
            self.add(f"{prefix}{shown}", f"unknown key{hint}")

    def table(self, value: object, path: str) -> Mapping[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.add(path, f"expected a table, {describe(value)}")
        return None

    def integer(self, value: object, path: str, bounds: tuple[int, int]) -> int | None:
        low, high = bounds
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        self.add(path, f"expected an integer from {low} to {high}, {describe(value)}")
        return None

    def duration(self, value: object, path: str, bounds: tuple[float, float]) -> float | None:
        if isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError:
                pass
            else:
                if bounds[0] <= seconds <= bounds[1]:
                    return seconds
                low, high = (format_duration(b) for b in bounds)
                self.add(path, f"expected a duration from {low} to {high}, {describe(value)}")
                return None
        self.add(path, f'expected a duration such as "250ms", "10s" or "5m", {describe(value)}')
        return None

    def name(self, value: str, path: str) -> bool:
        """True if ``value`` is short enough to be a name."""
        if len(value) <= MAX_NAME:
            return True
        self.add(path, f"expected at most {MAX_NAME} characters, got {len(value)}")
        return False

    def path(self, value: object, key: str, what: str, base_dir: str) -> str | None:
        """A path from the file, made absolute against ``base_dir``: a non-empty string with no
        NUL, short enough for the kernel."""
        if not isinstance(value, str) or not value:
            self.add(key, f"expected a {what} path, {describe(value)}")
            return None
        if "\0" in value:
            self.add(key, f"expected a {what} path without NUL characters, {describe(value)}")
            return None
        absolute = os.path.join(base_dir, value)
        size = len(os.fsencode(absolute))
        if size > MAX_PATH_BYTES:
            self.add(key, f"expected a path of at most {MAX_PATH_BYTES} bytes, got {size} bytes")
            return None
        return absolute

    def string_list(self, value: object, path: str, *, non_empty: bool) -> tuple[str, ...] | None:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            if non_empty and not value:
                self.add(path, "expected a non-empty list of strings, got an empty list")
                return None
            return tuple(value)
        self.add(path, f"expected a list of strings, {describe(value)}")
        return None


def load_pipeline(file: str | os.PathLike[str]) -> PipelineSpec:
    """Read and validate a pipeline file.

    Args:
        file: path of the TOML file.

    Returns:
        The validated pipeline, with every default filled in.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or has problems (all of them listed).
    """
    spec, problems = read_pipeline(file)
    if problems:
        raise ConfigError(spec.file, problems)
    return spec


def read_pipeline(file: str | os.PathLike[str]) -> tuple[PipelineSpec, list[Problem]]:
    """Read a pipeline file as far as it can be read: the pipeline (a wrong value replaced by its
    default) and every problem found, so that a caller can check the rest before reporting.

    Raises:
        ConfigError: the file cannot be read or is not TOML (nothing else can be checked).
    """
    name = os.fspath(file)
    try:
        with open(name, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(name, [Problem("", f"cannot read the file: {exc.strerror}")]) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(name, [Problem("", f"the file is larger than {MAX_FILE_BYTES >> 20} MiB")])
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(name, [Problem("", f"not valid TOML: not UTF-8 ({exc.reason})")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, [Problem("", f"not valid TOML: {exc}")]) from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(name, [Problem("", "not valid TOML: values are nested too deeply")]) from None
    except ValueError:  # int() refuses a literal of more than sys.get_int_max_str_digits() digits
        problem = f"not valid TOML: a number has more than {sys.get_int_max_str_digits()} digits"
        raise ConfigError(name, [Problem("", problem)]) from None
    return validate(document, name)


def validate(document: Mapping[str, Any], file: str) -> tuple[PipelineSpec, list[Problem]]:
    """Validate a parsed TOML document (see ``read_pipeline``)."""
    check = _Checker()
    check.unknown_keys(document, _TOP_KEYS, "")

    pipeline = check.table(document.get("pipeline", {}), "pipeline") or {}
    check.unknown_keys(pipeline, _PIPELINE_KEYS, "pipeline.")
    pipeline_name = pipeline.get("name", os.path.splitext(os.path.basename(file))[0])
    if isinstance(pipeline_name, str) and not check.name(pipeline_name, "pipeline.name"):
        pipeline_name = "pipeline"
    elif not isinstance(pipeline_name, str) or not _PIPELINE_NAME.match(pipeline_name):
        check.add(
            "pipeline.name",
            f"expected letters, digits, '.', '_' or '-', starting with a letter or digit, {describe(pipeline_name)}",
        )
    start_method = pipeline.get("start_method", "fork")
    if start_method not in START_METHODS:
        check.add("pipeline.start_method", f"expected one of {', '.join(START_METHODS)}, {describe(start_method)}")
    stop_timeout_s = DEFAULT_STOP_TIMEOUT_S
    if "stop_timeout" in pipeline:
        raw_timeout = pipeline["stop_timeout"]
        stop_timeout_s = check.duration(raw_timeout, "pipeline.stop_timeout", STOP_TIMEOUT_RANGE_S) or 0.0
    reload_timeout_s = DEFAULT_RELOAD_TIMEOUT_S
    if "reload_timeout" in pipeline:
        raw_reload = pipeline["reload_timeout"]
        reload_timeout_s = check.duration(raw_reload, "pipeline.reload_timeout", RELOAD_TIMEOUT_RANGE_S) or 0.0
    max_processes = 0
    if "max_processes" in pipeline:
        limits = (1, MAX_PROCESSES_LIMIT)
        max_processes = check.integer(pipeline["max_processes"], "pipeline.max_processes", limits) or 0

    defaults = check.table(document.get("defaults", {}), "defaults") or {}
    check.unknown_keys(defaults, _DEFAULTS_KEYS, "defaults.")
    default_restart = _restart(check, defaults.get("restart", {}), "defaults.restart", RestartSpec())
    default_strategy = _strategy(check, defaults.get("strategy", "one_for_one"), "defaults.strategy")
    default_queue = check.table(defaults.get("queue", {}), "defaults.queue") or {}
    check.unknown_keys(default_queue, _QUEUE_KEYS, "defaults.queue.")

    metrics = _metrics(check, pipeline["metrics"]) if "metrics" in pipeline else None

    stages_table = check.table(document.get("stages", {}), "stages")
    if stages_table is not None and not stages_table:
        check.add("stages", "a pipeline needs at least one [stages.NAME] table")
    stages_table = stages_table or {}
    base_dir = os.path.dirname(os.path.realpath(file))
    state_dir = pipeline.get("state_dir")
    if state_dir is None:
        state_dir = default_state_dir(pipeline_name if isinstance(pipeline_name, str) else "pipeline")
    # relative paths are the pipeline file's
    state_dir = check.path(state_dir, "pipeline.state_dir", "directory", base_dir) or base_dir
    ceiling = max_processes or default_max_processes()
    stages = [
        _stage(
            check,
            name,
            table,
            default_restart,
            default_strategy,
            state_dir,
            base_dir,
            ceiling,
            default_queue,
            pipeline_name,
        )
        for name, table in stages_table.items()
    ]
    _check_graph(check, stages)
    total = sum(s.processes for s in stages)
    if all(s.processes <= ceiling for s in stages) and total > ceiling:
        check.add(
            "stages",
            f"the stages run {total} processes in all, more than pipeline.max_processes ({ceiling}); "
            "raise pipeline.max_processes to run more",
        )
    packages, requirements = _environment(check, pipeline, base_dir, start_method)

    spec = PipelineSpec(
        name=pipeline_name if isinstance(pipeline_name, str) else "pipeline",
        file=file,
        start_method=start_method if start_method in START_METHODS else "fork",
        stop_timeout_s=stop_timeout_s,
        reload_timeout_s=reload_timeout_s,
        state_dir=state_dir,
        metrics=metrics,
        stages=tuple(stages),
        max_processes=max_processes,
        packages=packages,
        requirements=requirements,
    )
    return spec, check.problems


def _metrics(check: _Checker, raw: object) -> tuple[str, int] | None:
    """``"HOST:PORT"`` or ``"PORT"``: an IP address (or localhost), and a port no root needs."""
    if isinstance(raw, str) and len(raw) <= 64:
        host, _, port = raw.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            if host != "localhost":
                import ipaddress  # only a pipeline that serves metrics needs it

                ipaddress.ip_address(host)
            if port.isascii() and port.isdigit() and METRICS_PORTS[0] <= int(port) <= METRICS_PORTS[1]:
                return host, int(port)
        except ValueError:
            pass
    check.add(
        "pipeline.metrics",
        'expected "HOST:PORT" or "PORT" with an IP address (or localhost) and a port from '
        f'{METRICS_PORTS[0]} to {METRICS_PORTS[1]}, such as "127.0.0.1:9464", {describe(raw)}',
    )
    return None


def _environment(
    check: _Checker, pipeline: Mapping[str, Any], base_dir: str, start_method: object
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``packages`` (project directories, made absolute) and ``requirements`` of ``[pipeline]``."""
    packages = check.string_list(pipeline.get("packages", []), "pipeline.packages", non_empty=False) or ()
    resolved = []
    for index, package in enumerate(packages):
        directory = os.path.normpath(os.path.join(base_dir, package))
        if not os.path.isfile(os.path.join(directory, "pyproject.toml")):
            check.add(
                f"pipeline.packages[{index}]",
                "expected a project directory with a pyproject.toml, relative to the pipeline file; "
                f'"{directory}" has none',
            )
        resolved.append(directory)
    requirements = check.string_list(pipeline.get("requirements", []), "pipeline.requirements", non_empty=False) or ()
    for index, requirement in enumerate(requirements):
        if not requirement.strip() or requirement.lstrip().startswith("-"):
            check.add(
                f"pipeline.requirements[{index}]",
                f'expected a requirement such as "orjson>=3.9" (pip options are not allowed), {describe(requirement)}',
            )
    if (packages or requirements) and start_method == "fork":
        key = "packages" if packages else "requirements"
        check.add(
            "pipeline.start_method",
            f'"fork" (the default) cannot run stage code from the pipeline\'s environment, which "{key}" asks for: '
            "a forked worker is a copy of procd's own interpreter, which does not have the environment's "
            'packages; set start_method = "forkserver" (fast restarts) or "spawn"',
        )
    return tuple(resolved), requirements


def _restart(check: _Checker, value: object, path: str, base: RestartSpec) -> RestartSpec:
    """A restart table over ``base``: keys it leaves out keep their value from ``base``."""
    table = check.table(value, path) or {}
    check.unknown_keys(table, _RESTART_KEYS, f"{path}.")
    policy = table.get("policy", base.policy.value)
    if policy not in _POLICIES:
        check.add(f"{path}.policy", f"expected one of {', '.join(_POLICIES)}, {describe(policy)}")
        policy = base.policy.value
    maximum = check.integer(table["max"], f"{path}.max", RESTART_MAX_RANGE) if "max" in table else base.max
    within: float | None = base.within_s
    if "within" in table:
        within = check.duration(table["within"], f"{path}.within", WITHIN_RANGE_S)
    low, high = base.backoff_min_s, base.backoff_max_s
    if "backoff" in table:
        raw = table["backoff"]
        parts = raw.split("..") if isinstance(raw, str) else []
        try:
            if len(parts) not in (1, 2):  # "1s" alone is a fixed delay
                raise ValueError(raw)
            low, high = parse_duration(parts[0]), parse_duration(parts[-1])
        except ValueError:
            check.add(f"{path}.backoff", f'expected "MIN..MAX" durations such as "100ms..30s", {describe(raw)}')
        else:
            if not (BACKOFF_RANGE_S[0] <= low and high <= BACKOFF_RANGE_S[1]):
                shown = " to ".join(format_duration(b) for b in BACKOFF_RANGE_S)
                check.add(f"{path}.backoff", f"expected durations from {shown}, {describe(raw)}")
                low, high = base.backoff_min_s, base.backoff_max_s
            elif low > high:
                check.add(f"{path}.backoff", f"the first duration must not exceed the second, {describe(raw)}")
    return RestartSpec(
        policy=Restart(policy),
        max=maximum if maximum is not None else base.max,
        within_s=within if within is not None else base.within_s,
        backoff_min_s=low,
        backoff_max_s=high,
    )


def _strategy(check: _Checker, value: object, path: str) -> str:
    if value in STRATEGIES:
        return str(value)
    check.add(path, f"expected one of {', '.join(STRATEGIES)}, {describe(value)}")
    return "one_for_one"


def _stage(
    check: _Checker,
    name: str,
    value: object,
    default_restart: RestartSpec,
    default_strategy: str,
    state_dir: str,
    base_dir: str,
    ceiling: int,
    default_queue: Mapping[str, Any],
    pipeline_name: object,
) -> StageSpec:
    prefix = f"stages.{name}"
    if len(name) > MAX_NAME:
        check.add(prefix, f"a stage name has at most {MAX_NAME} characters, got {len(name)}")
    elif not _STAGE_NAME.match(name):
        check.add(prefix, "a stage name starts with a lower-case letter and has only a-z, 0-9, '_' and '-'")
    table = check.table(value, prefix) or {}
    check.unknown_keys(table, _STAGE_KEYS, f"{prefix}.")

    function = table.get("function")
    command = None
    if "function" in table and "command" in table:
        check.add(prefix, 'has both "function" and "command"; a stage runs exactly one of them')
    elif "function" not in table and "command" not in table:
        check.add(prefix, 'needs "function" (a Python "module:attr") or "command" (an argv list)')
    if isinstance(function, str) and len(function) > MAX_FUNCTION_REF:
        check.add(f"{prefix}.function", f"expected at most {MAX_FUNCTION_REF} characters, got {len(function)}")
        function = None
    elif function is not None and (not isinstance(function, str) or not _FUNCTION_REF.match(function)):
        check.add(f"{prefix}.function", f'expected "module:attr", such as "etl.stages:transform", {describe(function)}')
        function = None
    if "command" in table:
        command = check.string_list(table["command"], f"{prefix}.command", non_empty=True)
        for index, argument in enumerate(command or ()):
            if "\0" in argument:
                check.add(
                    f"{prefix}.command[{index}]", f"expected an argument without NUL characters, {describe(argument)}"
                )
                command = None
            elif len(os.fsencode(argument)) >= MAX_ARGUMENT_BYTES:
                check.add(f"{prefix}.command[{index}]", f"expected at most {MAX_ARGUMENT_BYTES - 1} bytes")
                command = None
        total = sum(len(os.fsencode(a)) + 1 for a in command or ())
        if total > MAX_COMMAND_BYTES:
            check.add(
                f"{prefix}.command", f"expected at most {MAX_COMMAND_BYTES} bytes of arguments in all, got {total}"
            )
            command = None

    inputs = check.string_list(table.get("inputs", []), f"{prefix}.inputs", non_empty=False) or ()
    processes = check.integer(table.get("processes", 1), f"{prefix}.processes", (1, ceiling)) or 1

    options = check.table(table.get("options", {}), f"{prefix}.options") or {}
    if options and "command" in table:
        check.add(f"{prefix}.options", "applies to function stages only; give a command its arguments in the argv list")

    queue_table = check.table(table.get("queue", {}), f"{prefix}.queue") or {}
    check.unknown_keys(queue_table, _QUEUE_KEYS, f"{prefix}.queue.")
    queue_table = {**default_queue, **queue_table}  # [defaults] queue, for every stage input
    maxsize = check.integer(queue_table.get("maxsize", DEFAULT_QUEUE_MAXSIZE), f"{prefix}.queue.maxsize", MAXSIZE_RANGE)
    backend = queue_table.get("backend", "memory")
    if backend not in BACKENDS:
        check.add(f"{prefix}.queue.backend", f"expected one of {', '.join(BACKENDS)}, {describe(backend)}")
        backend = "memory"
    default_batch = DEFAULT_QUEUE_BATCH
    if backend == "redis" and (maxsize or DEFAULT_QUEUE_MAXSIZE) >= DEFAULT_REDIS_BATCH:
        default_batch = DEFAULT_REDIS_BATCH
    batch = check.integer(queue_table.get("batch", default_batch), f"{prefix}.queue.batch", BATCH_RANGE)
    path = queue_table.get("path")
    if path is not None:
        path = check.path(path, f"{prefix}.queue.path", "file", base_dir)
        if backend != "sqlite":
            check.add(f"{prefix}.queue.path", 'applies to backend = "sqlite" only')
    path = (path or os.path.join(state_dir, f"{name}.queue.sqlite")) if backend == "sqlite" else None
    if backend == "sqlite" and "command" in table:
        check.add(f"{prefix}.queue.backend", "a durable queue needs a function stage to read it")
    redis = _redis_queue(check, queue_table, backend, prefix, f"procd:{pipeline_name}:{name}", tuple(inputs))
    queue = QueueSpec(maxsize or DEFAULT_QUEUE_MAXSIZE, batch or default_batch, backend, path, **redis)
    if maxsize and batch and batch > maxsize:
        check.add(f"{prefix}.queue.batch", f"must not exceed queue.maxsize ({maxsize}), got {batch}")

    restart = _restart(check, table.get("restart", {}), f"{prefix}.restart", default_restart)
    strategy = _strategy(check, table.get("strategy", default_strategy), f"{prefix}.strategy")
    max_attempts = check.integer(
        table.get("max_attempts", DEFAULT_MAX_ATTEMPTS), f"{prefix}.max_attempts", MAX_ATTEMPTS_RANGE
    )
    redeliver = table.get("redeliver", True)
    if not isinstance(redeliver, bool):
        check.add(f"{prefix}.redeliver", f"expected true or false, {describe(redeliver)}")
        redeliver = True
    dead_letter = table.get("dead_letter", os.path.join(state_dir, f"{name}.deadletter.jsonl"))
    dead_letter = check.path(dead_letter, f"{prefix}.dead_letter", "file", base_dir) or ""
    linger_s = DEFAULT_LINGER_S
    if "linger" in table:
        if inputs or not isinstance(function, str):
            check.add(f"{prefix}.linger", "only a function producer (a function stage without inputs) lingers")
        else:
            linger_s = check.duration(table["linger"], f"{prefix}.linger", LINGER_RANGE_S) or 0.0

    return StageSpec(
        name=name,
        function=function if isinstance(function, str) else None,
        command=command,
        inputs=inputs,
        processes=processes,
        options=dict(options),
        queue=queue,
        restart=restart,
        strategy=strategy,
        max_attempts=max_attempts or DEFAULT_MAX_ATTEMPTS,
        dead_letter=dead_letter,
        redeliver=redeliver,
        linger_s=linger_s,
    )


def _redis_queue(
    check: _Checker, table: Mapping[str, Any], backend: str, prefix: str, stream: str, upstream: tuple[str, ...]
) -> dict[str, Any]:
    """The keys of a ``backend = "redis"`` queue (an error on any other backend)."""
    if backend != "redis":
        for key in _REDIS_KEYS:
            if key in table:
                check.add(f"{prefix}.queue.{key}", 'applies to backend = "redis" only')
        return {}
    fields: dict[str, Any] = {"upstream": upstream, "codec": "json", "stream": stream}
    url = table.get("url")
    problem = (
        check_redis_url(url) if isinstance(url, str) else f"expected a URL such as redis://HOST:6379/0, {describe(url)}"
    )
    if problem is not None:
        check.add(f"{prefix}.queue.url", problem)
    else:
        fields["url"] = url
    if "stream" in table:
        value = table["stream"]
        if not isinstance(value, str) or not 0 < len(value) <= MAX_STREAM_NAME or "\0" in value:
            check.add(
                f"{prefix}.queue.stream", f"expected a key name of 1 to {MAX_STREAM_NAME} characters, {describe(value)}"
            )
        else:
            fields["stream"] = value
    if "claim_after" in table:
        fields["claim_after_s"] = (
            check.duration(table["claim_after"], f"{prefix}.queue.claim_after", CLAIM_AFTER_RANGE_S) or 30.0
        )
    codec = table.get("codec", "json")
    if codec not in CODECS:
        check.add(f"{prefix}.queue.codec", f"expected one of {', '.join(CODECS)}, {describe(codec)}")
    else:
        fields["codec"] = codec
    return fields


def check_redis_url(url: str) -> str | None:
    """Why ``url`` is not a Redis URL procd can use, or None when it is."""
    from urllib.parse import urlsplit  # only a pipeline with redis queues needs it

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as exc:
        return f"cannot be parsed ({exc})"
    if parts.scheme not in REDIS_SCHEMES:
        scheme = url.split(":", 1)[0][:20] if ":" in url else url[:20]
        return f'must start with {", ".join(s + "://" for s in REDIS_SCHEMES)}, got "{scheme}"'
    if parts.scheme == "unix" and not parts.path:
        return "a unix:// URL needs the socket's path (unix:///run/redis/redis.sock)"
    if parts.scheme != "unix" and not parts.hostname:
        return "needs a host (redis://HOST:PORT/DB)"
    return None


def redact_url(url: str) -> str:
    """``url`` with its password replaced, for records, ``procd show`` and ``procd status``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _check_graph(check: _Checker, stages: list[StageSpec]) -> None:
    """Every input names a stage, none twice, none itself; and the graph has no cycle."""
    names = [s.name for s in stages]
    for stage in stages:
        seen: set[str] = set()
        for index, upstream in enumerate(stage.inputs):
            path = f"stages.{stage.name}.inputs[{index}]"
            if upstream == stage.name:
                check.add(path, "a stage cannot read its own output")
            elif upstream not in names:
                close = close_matches(upstream, names)
                hint = f'; did you mean "{close[0]}"?' if close else f"; stages are {', '.join(names)}"
                check.add(path, f"unknown stage {_quoted(upstream[:MAX_NAME])}{hint}")
            elif upstream in seen:
                check.add(path, f'"{upstream}" is listed twice')
            seen.add(upstream)
    cycle = find_cycle({s.name: [i for i in s.inputs if i in names and i != s.name] for s in stages})
    if cycle:
        check.add("stages", f"the stages form a cycle: {' -> '.join(cycle)}")


def find_cycle(inputs: Mapping[str, list[str]]) -> list[str] | None:
    """Return one cycle of the input graph as a closed list of names, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for upstream in inputs.get(node, []):
            found = visit(upstream)
            if found:
                return found
        path.pop()
        done.add(node)
        return None

    for node in inputs:
        found = visit(node)
        if found:
            return list(reversed(found))
    return None


def as_document(spec: PipelineSpec) -> dict[str, Any]:
    """The effective pipeline as a TOML-ready document, every default written out."""
    stages: dict[str, Any] = {}
    for stage in spec.stages:
        table: dict[str, Any] = {}
        if stage.function is not None:
            table["function"] = stage.function
        if stage.command is not None:
            table["command"] = list(stage.command)
        table["inputs"] = list(stage.inputs)
        table["processes"] = stage.processes
        if stage.function is not None:
            table["options"] = dict(stage.options)
        table["queue"] = {"maxsize": stage.queue.maxsize, "batch": stage.queue.batch, "backend": stage.queue.backend}
        if stage.queue.path is not None:
            table["queue"]["path"] = stage.queue.path
        if stage.queue.url is not None:
            table["queue"].update(
                url=redact_url(stage.queue.url),
                stream=stage.queue.stream,
                claim_after=format_duration(stage.queue.claim_after_s),
                codec=stage.queue.codec,
            )
        restart = stage.restart
        table["restart"] = {
            "policy": restart.policy.value,
            "max": restart.max,
            "within": format_duration(restart.within_s),
            "backoff": f"{format_duration(restart.backoff_min_s)}..{format_duration(restart.backoff_max_s)}",
        }
        table["strategy"] = stage.strategy
        table["max_attempts"] = stage.max_attempts
        table["dead_letter"] = stage.dead_letter
        table["redeliver"] = stage.redeliver
        if stage.is_producer and stage.function is not None:
            table["linger"] = format_duration(stage.linger_s)
        stages[stage.name] = table
    return {
        "pipeline": {
            "name": spec.name,
            "start_method": spec.start_method,
            "stop_timeout": format_duration(spec.stop_timeout_s),
            "reload_timeout": format_duration(spec.reload_timeout_s),
            "state_dir": spec.state_dir,
            "max_processes": spec.process_ceiling,
            **({"metrics": format_address(spec.metrics)} if spec.metrics else {}),
            **({"packages": list(spec.packages)} if spec.packages else {}),
            **({"requirements": list(spec.requirements)} if spec.requirements else {}),
        },
        "stages": stages,
    }
