"""The command line: argv in, an exit code out. The only module that exits.

Exit codes: 0 finished (or stopped on request after a clean drain), 1 runtime failure,
2 usage error, 78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import os
import sys

# Only what a verb needs is imported, inside the function that needs it: ``--version`` imports
# nothing more than this module, ``status`` the control client and argparse, ``check`` the config
# loader; the supervisor, structlog and the environment builder only ``run`` (``cli.running``),
# and ``logs`` and ``dlq`` their own module (``cli.records``) (bench/README.md, "Start-up").
# The names below are for the type checker only (mypy reads ``TYPE_CHECKING`` by name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any

    from procd.errors import ConfigError
    from procd.launch.environment import BuildError

    _Commands = argparse._SubParsersAction[Any]  # of the Parser class made in _parser

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Given ``command``, the first argument when it names a
    sub-command, only that sub-command is built: the others cannot take part in parsing such a
    command line, and building all fourteen (with their help formatters) was a few milliseconds
    of every command (bench/README.md, "Start-up"). Otherwise (``procd``, ``procd --help``, a
    misspelt command) all of them, in the order the help lists them."""
    import argparse

    from procd import __version__

    class Formatter(argparse.HelpFormatter):
        """argparse's own, told the terminal's width: argparse would ask ``shutil``, importing it
        (with bz2, lzma and zlib) into every command for one call per argument."""

        def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
            width = _terminal_columns() - 2 if width is None else width
            super().__init__(prog, indent_increment, max_help_position, width)

    class Parser(argparse.ArgumentParser):
        """Every parser, the sub-commands' too (argparse makes them of the parent's class)."""

        def __init__(self, **options: Any) -> None:
            super().__init__(formatter_class=Formatter, **options)

    parser = Parser(
        prog="procd",
        description="Run a declarative TOML pipeline of supervised process groups.",
        epilog="exit codes: 0 finished, 1 runtime failure, 2 usage error, 78 configuration error",
    )
    parser.add_argument("--version", action="version", version=f"procd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command in _SUBCOMMANDS:
        _SUBCOMMANDS[command](commands)
    elif command in _VERBS:
        _add_verbs(commands, command)
    else:
        for name, add in _SUBCOMMANDS.items():
            add(commands)
            if name == "run":  # the control verbs follow run in the help
                _add_verbs(commands)
    return parser


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, as it finds them: ``$COLUMNS``, else the width of
    the terminal on standard output, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def _add_run(commands: _Commands) -> None:
    run = commands.add_parser("run", help="run a pipeline until it finishes or is stopped")
    run.add_argument("file", metavar="FILE")
    run.add_argument("--log-file", metavar="PATH", help="also append every record to PATH")
    run.add_argument(
        "--control", metavar="PATH", help="the control socket (default: under $XDG_RUNTIME_DIR/procd or /run/procd)"
    )
    run.add_argument(
        "--stages",
        metavar="NAME,NAME",
        help="run only these stages on this host (every host runs the same file; the queues between hosts are redis)",
    )


def _add_verbs(commands: _Commands, only: str | None = None) -> None:
    """The verbs of the control command table (status, stop, reload, scale: one request each);
    with ``only``, that one."""
    from procd.ops.commands import COMMANDS

    for command in COMMANDS.values():
        if command.verb and only in (None, command.name):
            verb = commands.add_parser(command.name, help=command.summary)
            _VERBS[command.name].arguments(verb)
            verb.add_argument("--control", metavar="PATH", help="the control socket (default: found by name)")


def _add_top(commands: _Commands) -> None:
    top = commands.add_parser("top", help="a live view of a running pipeline (q quits)")
    top.add_argument("pipeline", metavar="PIPELINE", nargs="?")
    top.add_argument("--control", metavar="PATH")


def _add_logs(commands: _Commands) -> None:
    from procd.log import LEVELS

    logs = commands.add_parser("logs", help="read procd's records from a log file or standard input")
    logs.add_argument("file", metavar="FILE", nargs="?", default="-", help="a --log-file, or - for stdin (default)")
    logs.add_argument("--stage")
    logs.add_argument("--worker", type=int)
    logs.add_argument("--event", action="append", default=[], help="repeat, or separate with commas")
    logs.add_argument("--level", choices=LEVELS, help="this level and above")
    logs.add_argument("--pid", type=int)
    logs.add_argument("--since", metavar="WHEN", help="a duration ago (10m, 2h) or an ISO time")
    logs.add_argument("--until", metavar="WHEN")
    logs.add_argument("--follow", "-f", action="store_true", help="keep reading as records are appended")
    logs.add_argument("--json", action="store_true", help="print the records as JSON lines")
    logs.add_argument("--summary", action="store_true", help="per stage: spawns, exits, restarts, items")
    logs.add_argument("--timeline", metavar="STAGE[INDEX]", help="one worker slot, generation by generation")


def _add_dlq(commands: _Commands) -> None:
    dlq = commands.add_parser("dlq", help="dead-letter files: list them, replay them")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    dlq_list = dlq_commands.add_parser("list", help="show the records of a dead-letter file")
    dlq_list.add_argument("file", metavar="FILE")
    dlq_list.add_argument("--json", action="store_true", help="one JSON record per line")
    dlq_replay = dlq_commands.add_parser("replay", help="feed the items of a dead-letter file into a stage")
    dlq_replay.add_argument("file", metavar="FILE")
    dlq_replay.add_argument("--into", metavar="STAGE", required=True)
    dlq_replay.add_argument(
        "--pipeline",
        metavar="PIPELINE_FILE",
        help="run this pipeline afresh, from STAGE down, fed only by the file (else: into a running one)",
    )
    dlq_replay.add_argument("--name", metavar="PIPELINE", help="the running pipeline (default: the only one)")
    dlq_replay.add_argument("--control", metavar="PATH")


def _add_check(commands: _Commands) -> None:
    check = commands.add_parser("check", help="validate pipeline files (exit 0 or 78)")
    check.add_argument("files", metavar="FILE", nargs="+")


def _add_file_command(name: str, summary: str) -> Callable[[_Commands], None]:
    def add(commands: _Commands) -> None:
        commands.add_parser(name, help=summary).add_argument("file", metavar="FILE")

    return add


def _add_init(commands: _Commands) -> None:
    init = commands.add_parser("init", help="write a commented starter pipeline and its stage module")
    init.add_argument("name", metavar="NAME")
    init.add_argument("--dir", default=".", help="where to write the files (default: here)")


def report_invalid(error: ConfigError) -> int:
    """Print every problem of an invalid pipeline file; return the exit code for it (78)."""
    say(*error.lines())
    return EXIT_CONFIG


def report_build(error: BuildError, command: str) -> int:
    """Print why ``command`` could not build the environment, with the build's last lines; return
    the exit code for it (1)."""
    tail = ["the last lines of its output:", *(f"    {line}" for line in error.tail.splitlines())]
    say(f"procd {command}: {error}", *(tail if error.tail else []))
    return EXIT_FAILURE


def say(*lines: str) -> None:
    """Lines to stderr, for a reader who may have gone (``| head``): the exit code stays true."""
    try:
        for line in lines:
            print(line, file=sys.stderr)
        sys.stderr.flush()
    except OSError:
        pass


def _check(files: Sequence[str]) -> int:
    code = EXIT_OK
    for file in files:
        result = _check_file(file)
        if result != EXIT_OK:
            code = result
    return code


def _check_file(file: str) -> int:
    """Whatever the stage code does, 0, 1 (an environment that cannot be built) or 78; a pipeline
    with packages has its code imported in its environment, built first."""
    from procd import callables, config
    from procd.errors import ConfigError

    try:
        spec, problems = config.read_pipeline(file)
        env = None
        if spec.has_environment:
            from procd.launch import environment  # only a pipeline with packages needs the builder

            try:
                spec, env, problems = environment.load_and_check(file, apart=True)
            except environment.BuildError as error:
                return report_build(error, "check")
            if env is not None:
                env.release()
        else:
            codes = callables.check_callables_apart(spec, callables.IMPORT_TIMEOUT_S, hashes=False)
            spec, problems = callables.complete(spec, codes, problems)
        if problems:
            raise ConfigError(file, problems)
    except ConfigError as error:
        return report_invalid(error)
    workers = sum(s.processes for s in spec.stages)
    where = f"; environment {env.path}" if env is not None else ""
    print(f"{file}: ok ({len(spec.stages)} stages, {workers} processes{where})")
    return EXIT_OK


def _build(file: str) -> int:
    """Build a pipeline's environment (or find it up to date) and say what and where."""
    from procd import config
    from procd.launch import environment
    from procd.launch.environment import BuildError

    spec = config.load_pipeline(file)
    if not spec.has_environment:
        print(f"{file}: no packages or requirements; its workers run in procd's own interpreter")
        return EXIT_OK
    try:
        env = environment.prepare(spec, progress=print)
    except BuildError as error:
        return report_build(error, "build")
    env.release()
    how = "built" if env.built else "up to date, reused"
    print(f"environment {env.path}: {how} in {env.seconds:.2f}s; workers run {env.python}")
    return EXIT_OK


def _init(name: str, directory: str) -> int:
    import re

    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        print(
            f"procd init: NAME must start with a-z and have only a-z, 0-9, '_' and '-', got {name!r}", file=sys.stderr
        )
        return EXIT_USAGE
    from procd.cli import starter  # only this command needs it

    files = starter.render(name)
    existing = [f for f in files if os.path.exists(os.path.join(directory, f))]
    if existing:
        print(f"procd init: {', '.join(existing)} already exists; nothing written", file=sys.stderr)
        return EXIT_FAILURE
    for file_name, text in files.items():
        with open(os.path.join(directory, file_name), "x", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {os.path.join(directory, file_name)}")
    return EXIT_OK


def _format_status(reply: dict[str, Any]) -> str:
    """The human table of ``procd status``."""
    lines = [
        f"pipeline {reply['pipeline']}  pid {reply['pid']}  {reply['state']}  up {reply['uptime_s']:.1f}s  "
        f"{reply['items_per_s']:,.0f} items/s into the sinks (last {reply['rate_window_s']:.0f}s)"
    ]
    if reply.get("transport_unavailable"):
        down = ", ".join(reply["transport_unavailable"])
        lines.append(f"the queue server of {down} cannot be reached; its workers wait for it")
    header = ("STAGE", "WORKER", "PID", "STATE", "GEN", "RESTARTS", "UPTIME", "IN", "OUT", "QUEUE")
    rows = [header]
    for stage in reply["stages"]:
        queue = stage["queue"]
        depth = "-" if queue is None else f"{queue['depth_batches']}/{queue['capacity_batches']}"
        for w in stage["workers"]:
            uptime = "-" if w["uptime_s"] is None else f"{w['uptime_s']:.1f}s"
            rows.append(
                (
                    stage["name"],
                    str(w["index"]),
                    str(w["pid"] or "-"),
                    w["state"],
                    str(w["generation"]),
                    str(w["restarts"]),
                    uptime,
                    str(w["items_in"]),
                    str(w["items_out"]),
                    depth,
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


class _UsageError(Exception):
    """A client verb's arguments cannot make a request."""


class _Verb:
    """The client side of one command of ``commands.COMMANDS``: its arguments, the request's
    fields made from them, and what a successful reply prints. (A plain class: a dataclass
    would import ``dataclasses`` and ``inspect`` into every command, ``--version`` included.)"""

    __slots__ = ("arguments", "fields", "show")

    def __init__(
        self,
        arguments: Callable[[argparse.ArgumentParser], object] = lambda p: p.add_argument(
            "pipeline", metavar="PIPELINE", nargs="?"
        ),
        fields: Callable[[argparse.Namespace], dict[str, Any]] = lambda _args: {},
        show: Callable[[argparse.Namespace, dict[str, Any]], str] = lambda _args, _reply: "",
    ) -> None:
        self.arguments = arguments
        self.fields = fields
        self.show = show


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", metavar="PIPELINE", nargs="?")
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")


def _format_reload(reply: dict[str, Any]) -> str:
    changes = [f"{key} {', '.join(reply[key])}" for key in ("changed", "added", "removed") if reply.get(key)]
    code = f" (code changed: {', '.join(reply['code_changed'])})" if reply.get("code_changed") else ""
    return ("; ".join(changes) or "nothing changed") + code + "\n"


def _scale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", metavar="PIPELINE")
    parser.add_argument("assignment", metavar="STAGE=N")


def _scale_fields(args: argparse.Namespace) -> dict[str, Any]:
    stage, _, count = args.assignment.partition("=")
    if not stage or not count.isascii() or not count.isdigit() or len(count) > 100:
        raise _UsageError(f"expected STAGE=N, such as transform=4, got {args.assignment[:120]!r}")
    return {"stage": stage, "processes": int(count)}  # the pipeline says how many it may run


def _json(value: Any, **options: Any) -> str:
    import json

    return json.dumps(value, **options)


_VERBS: dict[str, _Verb] = {
    "status": _Verb(
        _status_arguments,
        show=lambda args, reply: _json(reply, indent=2) + "\n" if args.json else _format_status(reply),
    ),
    "stop": _Verb(),
    "reload": _Verb(show=lambda _args, reply: _format_reload(reply)),
    "scale": _Verb(
        _scale_arguments,
        _scale_fields,
        lambda _args, reply: (
            f"{reply['stage']}: {reply['processes']} processes "
            f"(started {reply['started']}, retiring {reply['retiring']}"
            + (f", {reply['waiting']} waiting to start" if reply.get("waiting") else "")
            + ")\n"
        ),
    ),
}


# The sub-commands other than the control verbs, in the order the help lists them.
_SUBCOMMANDS: dict[str, Callable[[_Commands], None]] = {
    "run": _add_run,
    "top": _add_top,
    "logs": _add_logs,
    "dlq": _add_dlq,
    "check": _add_check,
    "build": _add_file_command("build", "build and install a pipeline's packages into its environment"),
    "graph": _add_file_command("graph", "print the stage graph in Graphviz DOT"),
    "show": _add_file_command("show", "print the effective pipeline, every default filled in"),
    "init": _add_init,
}


def _control(args: argparse.Namespace) -> int:
    """A verb of the command table: one request to a running pipeline's control socket."""
    from procd.ops import commands
    from procd.ops.commands import ControlError

    verb = _VERBS[args.command]
    try:
        fields = verb.fields(args)
    except _UsageError as exc:
        print(f"procd {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = commands.find_socket(args.pipeline, args.control)
        reply = commands.call(path, args.command, **fields)
    except ControlError as exc:
        print(f"procd {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not reply.get("ok"):
        print(f"procd {args.command}: {reply.get('error')}", file=sys.stderr)
        for problem in reply.get("problems", []):  # an invalid file on reload: what is wrong with it
            print(problem, file=sys.stderr)
        return EXIT_FAILURE
    sys.stdout.write(verb.show(args, reply))
    return EXIT_OK


def _top(args: argparse.Namespace) -> int:
    from procd.cli import top  # only this command draws
    from procd.ops import commands
    from procd.ops.commands import ControlError

    try:
        path = commands.find_socket(args.pipeline, args.control)

        def fetch() -> dict[str, Any]:
            reply = commands.call(path, "status")
            if not reply.get("ok"):
                raise ControlError(str(reply.get("error")))
            return reply

        if sys.stdin.isatty() and sys.stdout.isatty():
            top.live(fetch, sys.stdout)
        else:
            top.snapshot(fetch, sys.stdout)
    except ControlError as exc:
        print(f"procd top: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``procd`` command; return its exit code."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words == ["--version"]:  # the answer needs no parser
        from procd import __version__

        print(f"procd {__version__}")
        return EXIT_OK
    command = words[0] if words and not words[0].startswith("-") else None
    # ``dataclasses`` imports ``inspect`` (12 ms) only for a class without a docstring: what
    # reads it runs it on first use (the stage-code check, in its child; a worker whose producer
    # is not a plain function, ``callables.accepts``).
    from procd.deferred import defer

    defer("inspect")
    from procd import signals
    from procd.errors import ConfigError

    args = _parser(command).parse_args(words)
    if not (args.command == "run" or (args.command == "dlq" and args.dlq_command == "replay" and args.pipeline)):
        signals.release_held()  # no supervisor here to take them over
    if args.command == "run":
        # A daemon that loses its terminal goes on: every record still reaches the log file (or
        # the journal), and the exit code is the pipeline's own. Nothing here ends on EPIPE.
        from procd.cli import running

        running.reserve_standard_fds()
        try:
            return running.run(args.file, args.log_file, args.control, args.stages)
        except ConfigError as error:
            return report_invalid(error)
    try:
        if args.command in _VERBS:
            return _control(args)
        if args.command == "top":
            return _top(args)
        if args.command in ("logs", "dlq"):
            from procd.cli import records  # reading records and dead letters back

            if args.command == "logs":
                return records.logs(args)
            return records.dlq_list(args.file, args.json) if args.dlq_command == "list" else records.dlq_replay(args)
        if args.command == "check":
            return _check(args.files)
        if args.command == "init":
            return _init(args.name, args.dir)
        if args.command == "build":
            return _build(args.file)
        from procd import config

        spec = config.load_pipeline(args.file)
        if args.command == "graph":
            from procd import plan

            sys.stdout.write(plan.to_dot(spec))
        else:
            import tomli_w  # only `show` writes TOML

            sys.stdout.write(tomli_w.dumps(config.as_document(spec)))
        return EXIT_OK
    except ConfigError as error:
        return report_invalid(error)
    except BrokenPipeError:
        return EXIT_OK


def entry() -> None:
    """The ``procd`` command: ``main``, then leave without tearing the interpreter down.

    Everything procd opened is closed by then, and the supervisor never imports stage code, so
    there is nothing left to finalize; skipping the teardown saves a ``procd run`` about 15 ms.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone, a terminal hung up: the code stays true
            pass
    os._exit(code)
