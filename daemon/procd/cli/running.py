"""``procd run`` (and ``procd dlq replay --pipeline``): a pipeline file to a supervisor that runs
it, every problem of the file and of its stage code reported before anything starts.

Apart from the rest of the command line so that the commands that run no pipeline do not compile
it (these machines set ``PYTHONDONTWRITEBYTECODE=1``; bench/README.md, "Start-up").
"""

from __future__ import annotations

import os
import sys

from procd.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_USAGE, report_build, report_invalid, say

TYPE_CHECKING = False  # mypy reads the name; the imports below are for annotations only
if TYPE_CHECKING:
    from typing import Any

    from procd import config
    from procd.errors import ConfigError
    from procd.launch.environment import Environment
    from procd.ops.notify import Notifier


# While procd run builds, each tick (about a second apart) asks systemd for this much more time to start.
_BUILD_TICK_EXTENSION_USEC = 5_000_000


def _prepare(file: str) -> tuple[config.PipelineSpec, Environment | None]:
    """Load and validate, build the pipeline's environment if it has one (reusing it when nothing
    changed), and import every function stage's code: in the environment's interpreter, or in a
    forked child, so that this process stays free of user modules.

    Raises:
        ConfigError: the file is invalid, or stage code cannot be imported.
        BuildError: the environment cannot be built.
    """
    from procd.errors import ConfigError
    from procd.launch import environment

    spec, env, problems = environment.load_and_check(file, apart=True, reuse=True)
    if problems:
        if env is not None:
            env.release()
        raise ConfigError(file, problems)
    return spec, env


def reserve_standard_fds() -> None:
    """Open /dev/null on whichever of 0, 1 and 2 is closed (``procd run ... 2>&-``), so that no
    descriptor procd opens later (the log file, a queue, a pipe to a worker) lands there and
    receives what is meant for stderr."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:  # Python found it closed at start-up
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115


def run(file: str, log_file: str | None, control_path: str | None, stages: str | None = None) -> int:
    from procd import callables, config
    from procd.errors import ConfigError

    check = None
    try:
        spec, problems = config.read_pipeline(file)
        if not spec.has_environment:  # else its code is checked in its environment, once built
            # Begun before the supervisor's modules are imported: its child checks the stage
            # code while they load, on another core (bench/README.md, "Start-up").
            check = callables.CheckApart(spec)
    except ConfigError as error:
        return _config_invalid(file, log_file, error)
    try:
        from procd.errors import StoreError
        from procd.log import open_logger
        from procd.ops.commands import ControlError
        from procd.ops.notify import Notifier
        from procd.supervisor.core import Supervisor
        from procd.transport import Unavailable

        try:
            if check is not None:  # every problem, the stage code's too
                spec, problems = callables.complete(spec, check.result(), problems)
            if problems:
                raise ConfigError(file, problems)
            if stages is not None:
                spec, problems = config.select_stages(spec, [n.strip() for n in stages.split(",") if n.strip()])
                if problems:
                    raise ConfigError(file, problems)
        except ConfigError as error:
            return _config_invalid(file, log_file, error)
    finally:
        if check is not None:
            check.close()  # a check not waited for (an import above failed): its child goes
    try:
        log, writer = open_logger(spec.name, log_file=log_file)
    except OSError as exc:
        say(f"procd: cannot open the log file {log_file}: {exc.strerror}")
        return EXIT_USAGE
    try:
        env = None
        notifier = Notifier.from_environ()
        if spec.has_environment:
            prepared = _prepare_logged(spec, log, notifier)
            if prepared is None:
                return EXIT_FAILURE
            spec, env = prepared
        return Supervisor(spec, log, writer, control_path=control_path, notifier=notifier, environment=env).run()
    except ConfigError as error:
        log.error("config_invalid", file=file, problems=error.lines())
        return EXIT_CONFIG
    except ControlError as exc:
        log.error("control_unavailable", error=str(exc))
        return EXIT_FAILURE
    except StoreError as exc:
        log.error("queue_unavailable", error=str(exc))
        return EXIT_FAILURE
    except Unavailable as exc:  # a shared queue's server refused us (its record says so)
        log.error("transport_unavailable", error=str(exc), message="nothing was started")
        return EXIT_FAILURE
    finally:
        writer.close()


def _config_invalid(file: str, log_file: str | None, error: ConfigError) -> int:
    """Report an invalid pipeline file: on stderr, and as a record in the log file if there is one."""
    import io

    from procd.log import open_logger

    if log_file:
        name = os.path.splitext(os.path.basename(file))[0]
        log, writer = open_logger(name, log_file=log_file, stream=io.StringIO())
        log.error("config_invalid", file=file, problems=error.lines())
        writer.close()
    return report_invalid(error)


def _prepare_logged(
    spec: config.PipelineSpec, log: Any, notifier: Notifier
) -> tuple[config.PipelineSpec, Environment] | None:
    """Build (or reuse) the pipeline's environment and import its stage code there, with a record
    of either; None if the build failed (its record names the project and shows the output's tail).
    While a build runs, the service manager's start timeout is pushed back each second.

    Raises:
        ConfigError: stage code cannot be imported in the environment.
    """
    from procd import callables
    from procd.errors import ConfigError
    from procd.launch import environment
    from procd.launch.environment import BuildError

    def extend_start_timeout() -> None:
        try:
            notifier.send(EXTEND_TIMEOUT_USEC=_BUILD_TICK_EXTENSION_USEC, STATUS="building the pipeline's environment")
        except OSError:
            pass  # the supervisor reports a service manager that does not listen, once

    try:
        env = environment.prepare(spec, tick=extend_start_timeout)
    except BuildError as error:
        log.error(
            "environment_build_failed",
            project=error.project,
            error=str(error),
            output_tail=error.tail,
            message="nothing was started",
        )
        return None
    log.info(
        "environment_built" if env.built else "environment_reused",
        path=env.path,
        projects=[b.project for b in env.projects],
        seconds=round(env.seconds, 3),
    )
    codes = environment.check_stage_code(spec, env, reuse=True, tick=extend_start_timeout)
    spec, problems = callables.complete(spec, codes, [])
    if problems:
        env.release()
        raise ConfigError(spec.file, problems)
    return spec, env


def replay_fresh(pipeline_file: str, file: str, into: str) -> int:
    """Run the pipeline from ``into`` down, fed only by the dead-letter file."""
    import dataclasses

    from procd import config, plan
    from procd.errors import ConfigError
    from procd.launch.environment import BuildError
    from procd.log import open_logger
    from procd.ops import commands
    from procd.ops.commands import ControlError
    from procd.supervisor.core import Supervisor

    try:
        spec, env = _prepare(pipeline_file)
    except ConfigError as error:
        return report_invalid(error)
    except BuildError as error:
        return report_build(error, "dlq replay")
    names = [s.name for s in spec.stages]
    if into not in names:
        print(f"procd dlq replay: unknown stage {into!r}; stages are {', '.join(names)}", file=sys.stderr)
        return EXIT_USAGE
    keep = {into} | {s.name for s in spec.stages if into in plan.upstream_closure(spec, s.name)}
    source = config.StageSpec(
        name="dlq-replay", function="procd.transport.deadletters:replay", options={"path": os.path.abspath(file)}
    )
    stages = [source] + [
        dataclasses.replace(s, inputs=("dlq-replay",) if s.name == into else tuple(i for i in s.inputs if i in keep))
        for s in spec.stages
        if s.name in keep
    ]
    derived = dataclasses.replace(spec, stages=tuple(stages))
    log, writer = open_logger(derived.name)
    try:
        return Supervisor(
            derived, log, writer, control_path=commands.default_path(f"{derived.name}-replay"), environment=env
        ).run()
    except ControlError as exc:
        print(f"procd dlq replay: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        writer.close()
