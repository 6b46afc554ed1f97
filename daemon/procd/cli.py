"""The command line: argv in, an exit code out. The only module that exits.

Exit codes: 0 finished (or stopped on request after a clean drain), 1 runtime failure,
2 usage error, 78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence

from procd import __version__, callables, config, control, plan
from procd.control import ControlError
from procd.errors import ConfigError
from procd.log import open_logger
from procd.supervisor import Supervisor

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procd",
        description="Run a declarative TOML pipeline of supervised process groups.",
        epilog="exit codes: 0 finished, 1 runtime failure, 2 usage error, 78 configuration error",
    )
    parser.add_argument("--version", action="version", version=f"procd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run a pipeline until it finishes or is stopped")
    run.add_argument("file", metavar="FILE")
    run.add_argument("--log-file", metavar="PATH", help="also append every record to PATH")
    run.add_argument("--control", metavar="PATH", help="the control socket (default: under $XDG_RUNTIME_DIR/procd or /run/procd)")

    status = commands.add_parser("status", help="every stage and worker of a running pipeline")
    status.add_argument("pipeline", metavar="PIPELINE", nargs="?")
    status.add_argument("--json", action="store_true", help="print the reply as JSON")
    status.add_argument("--control", metavar="PATH")

    stop = commands.add_parser("stop", help="stop a running pipeline (the same as SIGTERM)")
    stop.add_argument("pipeline", metavar="PIPELINE", nargs="?")
    stop.add_argument("--control", metavar="PATH")

    reload = commands.add_parser("reload", help="re-read a running pipeline's file (the same as SIGHUP)")
    reload.add_argument("pipeline", metavar="PIPELINE", nargs="?")
    reload.add_argument("--control", metavar="PATH")

    scale = commands.add_parser("scale", help="change the number of processes of a stage: STAGE=N")
    scale.add_argument("pipeline", metavar="PIPELINE")
    scale.add_argument("assignment", metavar="STAGE=N")
    scale.add_argument("--control", metavar="PATH")

    check = commands.add_parser("check", help="validate pipeline files (exit 0 or 78)")
    check.add_argument("files", metavar="FILE", nargs="+")

    graph = commands.add_parser("graph", help="print the stage graph in Graphviz DOT")
    graph.add_argument("file", metavar="FILE")

    show = commands.add_parser("show", help="print the effective pipeline, every default filled in")
    show.add_argument("file", metavar="FILE")

    init = commands.add_parser("init", help="write a commented starter pipeline and its stage module")
    init.add_argument("name", metavar="NAME")
    init.add_argument("--dir", default=".", help="where to write the files (default: here)")
    return parser


def _load(file: str, *, imports: bool, apart: bool = False) -> config.PipelineSpec:
    """Load and validate; with ``imports``, also import every function stage's code (in a
    forked child with ``apart``, so that this process stays free of user modules)."""
    spec = config.load_pipeline(file)
    if imports:
        problems = (callables.check_callables_apart if apart else callables.check_callables)(spec)
        if problems:
            raise ConfigError(file, problems)
    return spec


def _report(error: ConfigError) -> int:
    for line in error.lines():
        print(line, file=sys.stderr)
    return EXIT_CONFIG


def _run(file: str, log_file: str | None, control_path: str | None) -> int:
    try:
        spec = _load(file, imports=True, apart=True)
    except ConfigError as error:
        if log_file:
            log, writer = open_logger(os.path.splitext(os.path.basename(file))[0], log_file=log_file, stream=_Null())
            log.error("config_invalid", file=file, problems=error.lines())
            writer.close()
        return _report(error)
    try:
        log, writer = open_logger(spec.name, log_file=log_file)
    except OSError as exc:
        print(f"procd: cannot open the log file {log_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return Supervisor(spec, log, writer, control_path=control_path).run()
    except ControlError as exc:
        log.error("control_unavailable", error=str(exc))
        return EXIT_FAILURE
    finally:
        writer.close()


class _Null:
    """A stream that shows nothing (for a record that goes to the log file only)."""

    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _check(files: Sequence[str]) -> int:
    code = EXIT_OK
    for file in files:
        try:
            spec = _load(file, imports=True)
        except ConfigError as error:
            code = _report(error)
            continue
        workers = sum(s.processes for s in spec.stages)
        print(f"{file}: ok ({len(spec.stages)} stages, {workers} processes)")
    return code


def _init(name: str, directory: str) -> int:
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        print(f"procd init: NAME must start with a-z and have only a-z, 0-9, '_' and '-', got {name!r}", file=sys.stderr)
        return EXIT_USAGE
    from procd import starter  # only this command needs it

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


def _format_status(reply: dict) -> str:
    """The human table of ``procd status``."""
    lines = [f"pipeline {reply['pipeline']}  pid {reply['pid']}  {reply['state']}  up {reply['uptime_s']:.1f}s"]
    header = ("STAGE", "WORKER", "PID", "STATE", "GEN", "RESTARTS", "UPTIME", "IN", "OUT", "QUEUE")
    rows = [header]
    for stage in reply["stages"]:
        queue = stage["queue"]
        depth = "-" if queue is None else f"{queue['depth_batches']}/{queue['capacity_batches']}"
        for w in stage["workers"]:
            uptime = "-" if w["uptime_s"] is None else f"{w['uptime_s']:.1f}s"
            rows.append(
                (stage["name"], str(w["index"]), str(w["pid"] or "-"), w["state"], str(w["generation"]),
                 str(w["restarts"]), uptime, str(w["items_in"]), str(w["items_out"]), depth)
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def _control(args: argparse.Namespace) -> int:
    """status, stop, reload and scale: one request to a running pipeline's control socket."""
    message: dict = {"command": args.command}
    if args.command == "scale":
        stage, _, count = args.assignment.partition("=")
        if not stage or not count.isdigit():
            print(f"procd scale: expected STAGE=N, such as transform=4, got {args.assignment!r}", file=sys.stderr)
            return EXIT_USAGE
        message.update(stage=stage, processes=int(count))
    try:
        path = control.find_socket(args.pipeline, args.control)
        reply = control.request(path, message)
    except ControlError as exc:
        print(f"procd {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not reply.get("ok"):
        print(f"procd {args.command}: {reply.get('error')}", file=sys.stderr)
        return EXIT_FAILURE
    if args.command == "status":
        sys.stdout.write(json.dumps(reply, indent=2) + "\n" if args.json else _format_status(reply))
    elif args.command == "scale":
        print(f"{reply['stage']}: {reply['processes']} processes (started {reply['started']}, retiring {reply['retiring']})")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``procd`` command; return its exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.file, args.log_file, args.control)
        if args.command in ("status", "stop", "reload", "scale"):
            return _control(args)
        if args.command == "check":
            return _check(args.files)
        if args.command == "init":
            return _init(args.name, args.dir)
        spec = _load(args.file, imports=False)
        if args.command == "graph":
            sys.stdout.write(plan.to_dot(spec))
        else:
            import tomli_w  # only `show` writes TOML

            sys.stdout.write(tomli_w.dumps(config.as_document(spec)))
        return EXIT_OK
    except ConfigError as error:
        return _report(error)
    except BrokenPipeError:
        return EXIT_OK
