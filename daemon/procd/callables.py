"""Finds a stage's code and checks that procd can call it the way the file says, before any
process starts.

A function stage's ``"module:attr"`` is imported with the pipeline's directory first on
``sys.path``, and its signature is bound to the stage's ``options`` exactly as a worker will call
it; a command stage's program is looked up the way ``execvp`` will (``PATH`` included). Used by
``procd check``, ``procd run`` and reload (in a forked child, see ``check_callables_apart``), so
that whatever fails here is a config error (exit 78); and by each worker to get the object it calls.

Discussion: what the check reports about each stage besides its problems. ``code_hash`` digests
the source of every module the stage's import loaded from the pipeline's directory (third-party
packages aside), so that a reload can restart the stages whose code changed: each stage is
imported with the pipeline's own modules cleared from ``sys.modules`` first, so that a module two
stages share counts for both (``procd check`` has no use for it and asks for none, ``hashes``:
``hashlib`` loads libcrypto, 3-4 ms of its check). ``shardable`` says the producer accepts a
``shard`` parameter and so may run in several processes (each yields its share). ``path_options``
names the options whose parameter is annotated ``pathlib.Path``: those, and only those, are paths
relative to the pipeline file's directory; ``load_and_check`` makes them absolute.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import marshal
import os
import re
import select
import signal
import sys
import time
import types
from collections.abc import Iterator, Mapping
from typing import Any

from procd import config, procctl, reaper
from procd.config import PipelineSpec, StageSpec
from procd.errors import ConfigError, Problem
from procd.frozen import frozen_dataclass

# Parameters procd fills in itself for a producer that declares them.
INJECTED = ("checkpoint", "shard")
# How long the stage code of a whole pipeline may take to import before the check gives up.
IMPORT_TIMEOUT_S = 120.0


@frozen_dataclass(frozen=True)
class Shard:
    """What a producer with a ``shard`` parameter receives: this process's share of the work.
    A producer with ``processes = N`` runs as N processes, ``index`` 0 to N - 1, each of which
    should yield only the items that belong to it (for example ``n % count == index``). It
    unpacks as ``index, count = shard``."""

    index: int
    count: int

    def __iter__(self) -> Iterator[int]:
        return iter((self.index, self.count))


class ResolveError(Exception):
    """The module or the attribute cannot be had; the message says which and why."""


def _shown_path(path: str, base_dir: str) -> str:
    """A source file as the user knows it: relative to the pipeline's directory when inside it."""
    try:
        relative = os.path.relpath(path, base_dir)
    except ValueError:
        return path
    return path if relative.startswith("..") else relative


def _where(exc: BaseException, base_dir: str) -> str:
    """The user's file and line that an import error points to (never importlib's frames)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{_shown_path(exc.filename, base_dir)}:{exc.lineno}"
    import traceback  # only a stage whose import failed needs it (with linecache, tokenize: 4 ms)

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    frames = frames[1:]  # the first is resolve's own import_module call
    own = [f for f in frames if os.path.abspath(f.filename).startswith(base_dir + os.sep)]
    if not (own or frames):
        return ""
    frame = (own or frames)[-1]
    return f"{_shown_path(frame.filename, base_dir)}:{frame.lineno}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve(ref: str, base_dir: str) -> Any:
    """Import ``module`` from ``"module:attr"`` and return ``attr``.

    Whatever the module does at import or in a module ``__getattr__`` (``SystemExit`` and
    ``KeyboardInterrupt`` included) becomes a ``ResolveError``.

    Args:
        ref: ``"package.module:attr"``; ``attr`` may be dotted.
        base_dir: put first on ``sys.path`` (once) before importing.

    Raises:
        ResolveError: the import failed, or the attribute is missing or not callable.
    """
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    module_name, _, attr_path = ref.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except BaseException as exc:  # user code at import time may raise anything, SystemExit too
        detail = _describe(exc)
        if not isinstance(exc, ModuleNotFoundError) or exc.name != module_name.split(".")[0]:
            where = _where(exc, base_dir)
            detail += f" (at {where})" if where else ""
        raise ResolveError(f'cannot import module "{module_name}": {detail}') from None
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ResolveError(f'module "{module_name}" has no attribute "{attr_path}"') from None
        except BaseException as exc:  # a module __getattr__ that raises something else
            detail = f"{_describe(exc)} (at {_where(exc, base_dir)})"
            raise ResolveError(f'getting "{attr_path}" from module "{module_name}" failed: {detail}') from None
    if not callable(target):
        raise ResolveError(f'"{ref}" is a {type(target).__name__}, not a function or class')
    return target


def _signature(target: Any) -> inspect.Signature | None:
    """How ``target`` is called (a class: its constructor), or None when Python cannot say."""
    for eval_str in (True, False):  # string annotations evaluated when they can be
        try:
            return inspect.signature(target, eval_str=eval_str)
        except (TypeError, ValueError):
            return None
        except Exception:
            continue
    return None


# A parameter's kind, numbered as ``inspect.Parameter.kind`` is (an ``IntEnum`` there).
POSITIONAL_ONLY, POSITIONAL_OR_KEYWORD, VAR_POSITIONAL, KEYWORD_ONLY, VAR_KEYWORD = range(5)
_CO_VARARGS, _CO_VARKEYWORDS = 0x04, 0x08  # ``code.co_flags``: ``inspect.CO_VARARGS``, ``inspect.CO_VARKEYWORDS``


@frozen_dataclass(frozen=True)
class _Parameter:
    """One parameter of a stage's callable, as ``_bind_options`` reads it: its name, kind, whether
    it has a default, and its annotation (None without one)."""

    name: str
    kind: int
    has_default: bool
    annotation: Any


def _parameters(target: Any) -> dict[str, _Parameter] | None:
    """How ``target`` is called, in order, as ``inspect.signature`` sees it with its string
    annotations evaluated where they can be (``_signature``); None when Python cannot say.

    A plain function's are read from its code, defaults and annotations, as ``inspect`` reads
    them: running ``inspect`` (with ``ast``, ``dis``, ``tokenize``) was 9 ms of a ``procd check``,
    in its check child (bench/README.md, "Start-up"). Anything else goes through ``inspect``."""
    code = _plain_code(target)
    if code is None:
        signature = _signature(target)
        if signature is None:
            return None
        return {
            p.name: _Parameter(
                p.name, int(p.kind), p.default is not p.empty, None if p.annotation is p.empty else p.annotation
            )
            for p in signature.parameters.values()
        }
    annotations = target.__annotations__  # a dict: a function refuses anything else
    try:  # ``inspect.get_annotations(eval_str=True)``; ``_signature`` says what a failure means
        annotations = {k: eval(v, target.__globals__) if isinstance(v, str) else v for k, v in annotations.items()}
    except (TypeError, ValueError):
        return None
    except Exception:
        annotations = dict(annotations)
    names = code.co_varnames
    positional, keyword_only = code.co_argcount, code.co_kwonlyargcount
    first_default = positional - len(target.__defaults__ or ())
    keyword_defaults = target.__kwdefaults__ or {}
    found = [
        _Parameter(
            name,
            POSITIONAL_ONLY if index < code.co_posonlyargcount else POSITIONAL_OR_KEYWORD,
            index >= first_default,
            annotations.get(name),
        )
        for index, name in enumerate(names[:positional])
    ]
    rest = positional + keyword_only  # co_varnames: positional, keyword-only, *args, **kwargs
    if code.co_flags & _CO_VARARGS:
        found.append(_Parameter(names[rest], VAR_POSITIONAL, False, annotations.get(names[rest])))
        rest += 1
    found += [
        _Parameter(name, KEYWORD_ONLY, name in keyword_defaults, annotations.get(name))
        for name in names[positional : positional + keyword_only]
    ]
    if code.co_flags & _CO_VARKEYWORDS:
        found.append(_Parameter(names[rest], VAR_KEYWORD, False, annotations.get(names[rest])))
    return {p.name: p for p in found}


def accepts(target: Any, name: str) -> bool:
    """True if calling ``target`` (a function, or a class through its ``__init__``) takes a
    keyword argument called ``name``."""
    code = _plain_code(target)
    if code is not None:  # what ``inspect.signature`` would read, without running ``inspect``
        return name in code.co_varnames[code.co_posonlyargcount : code.co_argcount + code.co_kwonlyargcount]
    signature = _signature(target)
    if signature is None:
        return False
    parameter = signature.parameters.get(name)
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def _plain_code(target: Any) -> types.CodeType | None:
    """The code of a plain Python function whose signature is its code's, else None: not wrapped
    (``functools.wraps``), with no ``__signature__``. A worker asks whether its producer takes
    ``checkpoint`` or ``shard``; answered from the code, ``inspect`` (deferred by the command
    line, about 12 ms and its own copy of the pages) need not run in every worker."""
    if type(target) is not types.FunctionType:
        return None
    if any(hasattr(target, attribute) for attribute in ("__wrapped__", "__signature__", "_partialmethod")):
        return None
    return target.__code__


def is_class(target: Any) -> bool:
    """Classes are instantiated once per worker; functions are called directly."""
    return isinstance(target, type)


_PATH_TEXT = re.compile(r"(pathlib\.)?(Pure)?(Posix)?Path\Z")


def _is_path(annotation: Any) -> bool:
    """True for ``pathlib.Path`` (or ``Path | None``), evaluated or left as a string."""
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]
        return any(_PATH_TEXT.match(p) for p in parts) and all(_PATH_TEXT.match(p) or p == "None" for p in parts)
    if isinstance(annotation, type):  # a class can be a path only once pathlib has been imported
        pathlib = sys.modules.get("pathlib")
        return pathlib is not None and issubclass(annotation, pathlib.PurePath)
    import typing

    arguments = typing.get_args(annotation)
    return bool(arguments) and all(a is type(None) or _is_path(a) for a in arguments) and any(map(_is_path, arguments))


@frozen_dataclass(frozen=True)  # internal: its methods need not be compiled at each start
class StageCode:
    """What checking one stage's code found: its problems, and the facts described at the top."""

    problems: tuple[Problem, ...] = ()
    code_hash: str = ""
    shardable: bool = False
    path_options: tuple[str, ...] = ()


def _bind_options(stage: StageSpec, target: Any) -> tuple[list[Problem], tuple[str, ...]]:
    """Bind the stage's options to ``target``'s signature the way a worker calls it: a consumer
    function as ``f(item, **options)``, a class as ``C(**options)``, a producer function as
    ``f(**options)``; a producer also gets ``checkpoint`` and ``shard`` if it names them."""
    prefix = f"stages.{stage.name}.options"
    by_name = _parameters(target)
    if by_name is None:
        return [], ()
    parameters = list(by_name.values())
    item = None
    if not stage.is_producer and not is_class(target):
        positional = [p for p in parameters if p.kind in (POSITIONAL_ONLY, POSITIONAL_OR_KEYWORD)]
        if positional:
            item = positional[0].name
        elif not any(p.kind == VAR_POSITIONAL for p in parameters):
            return [Problem(f"stages.{stage.name}.function", "takes no positional parameter for the item")], ()
    injected = {n for n in INJECTED if stage.is_producer}
    keywords = [
        p.name
        for p in parameters
        if p.kind in (POSITIONAL_OR_KEYWORD, KEYWORD_ONLY) and p.name != item and p.name not in injected
    ]
    open_ended = any(p.kind == VAR_KEYWORD for p in parameters)
    problems = []
    for key in stage.options:
        path = f"{prefix}.{key}"
        if key == item:
            problems.append(Problem(path, f"is the item parameter of {stage.function}; an option cannot set it"))
        elif key in injected and key in by_name:
            problems.append(Problem(path, "is given by procd to a producer that declares it; remove it from options"))
        elif key not in keywords and not open_ended:
            close = config.close_matches(key, keywords)
            hint = (
                f'did you mean "{close[0]}"?'
                if close
                else (f"{stage.function} takes {', '.join(keywords)}" if keywords else f"{stage.function} takes none")
            )
            problems.append(Problem(path, f"unexpected option; {hint}"))
    for parameter in parameters:
        required = not parameter.has_default and parameter.kind not in (VAR_POSITIONAL, VAR_KEYWORD)
        if not required or parameter.name == item or parameter.name in stage.options:
            continue
        if parameter.name in injected:
            continue
        if parameter.kind == POSITIONAL_ONLY:
            message = f'{stage.function} has a positional-only parameter "{parameter.name}" that options cannot give'
        else:
            message = f'missing required option "{parameter.name}"'
        problems.append(Problem(prefix, message))
    paths = []
    for key, value in stage.options.items():
        annotated = by_name.get(key)
        if annotated is None or not _is_path(annotated.annotation):
            continue
        if isinstance(value, str) and value and "\0" not in value:
            paths.append(key)
        else:
            problems.append(
                Problem(f"{prefix}.{key}", f"expected a path (the parameter is a Path), {config.describe(value)}")
            )
    return problems, tuple(paths)


def _producer_problems(stage: StageSpec, target: Any) -> tuple[list[Problem], bool]:
    """A producer in several processes must split its work: it says so with a ``shard`` parameter."""
    # several processes of a producer that keeps a checkpoint would share one
    shardable = accepts(target, "shard") and not accepts(target, "checkpoint")
    if stage.processes == 1:
        return [], shardable
    path = f"stages.{stage.name}.processes"
    if not accepts(target, "shard"):
        message = (
            f"a producer in {stage.processes} processes yields every item {stage.processes} times; give "
            f'{stage.function} a "shard" parameter to split its work (see the README), or set processes = 1'
        )
        return [Problem(path, message)], False
    if not shardable:
        message = "a producer in several processes cannot keep a checkpoint (its processes would share one)"
        return [Problem(path, message)], False
    return [], True


def find_program(program: str) -> str:
    """Where ``execvp`` would find ``program``: a name with a slash as it is (relative to the
    current directory), any other on ``PATH`` (``os.defpath`` if unset).

    Raises:
        ResolveError: not found, or not an executable file.
    """
    if "/" in program:
        if not os.path.exists(program):
            raise ResolveError(f'program "{program}" not found (relative to {os.getcwd()})')
        if os.path.isdir(program) or not os.access(program, os.X_OK):
            raise ResolveError(f'program "{program}" is not an executable file')
        return program
    search = os.environ.get("PATH", os.defpath)
    import shutil  # only a command stage needs it

    found = shutil.which(program, path=search)
    if found is None:
        present = [
            os.path.join(d, program) for d in search.split(os.pathsep) if os.path.exists(os.path.join(d, program))
        ]
        if present:
            raise ResolveError(f'program "{program}" is not executable ({present[0]})')
        raise ResolveError(f'program "{program}" not found on PATH ({search})')
    return found


def _own_modules(base_dir: str) -> dict[str, str]:
    """Modules loaded from the pipeline's directory (a virtual environment inside it aside)."""
    found = {}
    for name, module in list(sys.modules.items()):
        if name == "procd" or name.startswith("procd."):  # procd's own, in a source checkout
            continue
        file = getattr(module, "__file__", None)
        if not isinstance(file, str):
            continue
        path = os.path.abspath(file)
        if not path.startswith(base_dir + os.sep) or "-packages" + os.sep in path:
            continue
        if path.startswith(sys.prefix + os.sep):
            continue
        found[name] = path
    return found


def _digest(files: Mapping[str, str], base_dir: str) -> str:
    import hashlib  # here: the supervisor, which never hashes code, need not load libcrypto

    digest = hashlib.sha256()
    for path in sorted(set(files.values())):
        try:
            with open(path, "rb") as fh:
                content = fh.read()
        except OSError:
            content = b""
        digest.update(f"{os.path.relpath(path, base_dir)}\0".encode())
        digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()[:16]


def check_stage(stage: StageSpec, base_dir: str, *, hashes: bool = True) -> StageCode:
    """Check one stage's code; see the module's docstring for what is found (``code_hash`` only
    with ``hashes``)."""
    if stage.command is not None:
        try:
            find_program(stage.command[0])
        except ResolveError as exc:
            return StageCode((Problem(f"stages.{stage.name}.command[0]", str(exc)),))
        if stage.is_producer and stage.processes > 1:
            message = (
                f"a producing command in {stage.processes} processes runs {stage.processes} times and yields "
                "every item as often; set processes = 1"
            )
            return StageCode((Problem(f"stages.{stage.name}.processes", message),))
        return StageCode()
    if stage.function is None:
        return StageCode()
    for name in _own_modules(base_dir):  # imported afresh, so this stage's modules count for it
        del sys.modules[name]
    try:
        target = resolve(stage.function, base_dir)
    except ResolveError as exc:
        return StageCode((Problem(f"stages.{stage.name}.function", str(exc)),))
    code_hash = _digest(_own_modules(base_dir), base_dir) if hashes else ""
    problems, paths = _bind_options(stage, target)
    shardable = False
    if stage.is_producer:
        more, shardable = _producer_problems(stage, target)
        problems += more
    return StageCode(tuple(problems), code_hash, shardable, paths)


def check_callables(spec: PipelineSpec, *, hashes: bool = True) -> dict[str, StageCode]:
    """Check every stage's code in this process (``check_callables_apart`` keeps it out)."""
    base_dir = spec.base_dir
    codes = {}
    for stage in spec.stages:
        try:
            codes[stage.name] = check_stage(stage, base_dir, hashes=hashes)
        except Exception as exc:  # a signature or annotation that misbehaves in a way not foreseen
            problem = Problem(f"stages.{stage.name}", f"checking the stage failed: {_describe(exc)}")
            codes[stage.name] = StageCode((problem,))
    return codes


def check_callables_apart(
    spec: PipelineSpec, timeout_s: float = IMPORT_TIMEOUT_S, *, hashes: bool = True
) -> dict[str, StageCode]:
    """``check_callables`` in forked children, so that the caller never imports user code.

    The supervisor uses this: a module imported in the supervisor would be inherited by every
    forked worker, so a reload could never load new code, and a module that starts threads at
    import would make every later fork unsafe. ``procd check`` uses it too: whatever a module does
    (``os._exit``, a signal, an endless loop at import) ends only the child, and is reported as
    a problem of the stage being imported; a new child checks the stages after it. The whole
    check takes at most ``timeout_s``; a stage not reached by then is reported as not checked.
    """
    check = CheckApart(spec, timeout_s, hashes=hashes)
    try:
        return check.result()
    finally:
        check.close()


class CheckApart:
    """``check_callables_apart`` begun: its first child is forked at once and ``result`` waits for
    the whole check, so that what the caller does meanwhile runs alongside it (``procd run``
    imports the supervisor while its stage code is checked). ``close`` ends a check whose result
    is not wanted any more: its child is killed and reaped."""

    def __init__(self, spec: PipelineSpec, timeout_s: float = IMPORT_TIMEOUT_S, *, hashes: bool = True) -> None:
        self._spec = spec
        self._timeout_s = timeout_s
        self._hashes = hashes
        self._deadline = time.monotonic() + timeout_s
        self._remaining = list(spec.stages)
        self._child = _fork_checker(spec, self._remaining, hashes) if self._remaining else None

    def result(self) -> dict[str, StageCode]:
        """What the check found for every stage (see ``check_callables_apart``)."""
        spec, codes = self._spec, {}
        while self._remaining:
            pid, read_fd = self._child or _fork_checker(spec, self._remaining, self._hashes)
            self._child = None
            found, importing, ended, timed_out = _collect(pid, read_fd, self._deadline)
            codes.update(found)
            how = f"did not finish within {self._timeout_s:g}s" if timed_out else f"ended the check process ({ended})"
            if importing is not None:
                ref = spec.stage(importing).function
                codes[importing] = StageCode((Problem(f"stages.{importing}.function", f'importing "{ref}" {how}'),))
            if timed_out or importing is None:  # out of time, or the child ended between two stages
                for stage in self._remaining:
                    if stage.name not in codes:
                        problem = Problem(f"stages.{stage.name}", f"not checked: the check of the stage code {how}")
                        codes[stage.name] = StageCode((problem,))
            self._remaining = [s for s in self._remaining if s.name not in codes]
        return codes

    def close(self) -> None:
        """Kill and reap a child whose result was not collected; nothing otherwise."""
        if self._child is not None:
            pid, read_fd = self._child
            self._child = None
            os.close(read_fd)
            os.kill(pid, signal.SIGKILL)
            reaper.wait_for(pid)


def _fork_checker(spec: PipelineSpec, stages: list[StageSpec], hashes: bool) -> tuple[int, int]:
    """Fork a child that checks ``stages`` one after the other; its pid, and the descriptor it
    reports on (``_report``): once as it starts to import a stage, once with what it found."""
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            procctl.die_with_parent(signal.SIGKILL, parent)  # an import that hangs dies with its checker
            os.close(read_fd)
            signal.set_wakeup_fd(-1)  # the supervisor's: a signal to this child is not the supervisor's
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            for stage in stages:
                _report(write_fd, {"importing": stage.name})
                code = check_callables(dataclasses.replace(spec, stages=(stage,)), hashes=hashes)[stage.name]
                _report(write_fd, {"stage": stage.name, **_as_json(code)})
        finally:
            os._exit(0)
    os.close(write_fd)
    return pid, read_fd


def _collect(pid: int, read_fd: int, deadline: float) -> tuple[dict[str, StageCode], str | None, str, bool]:
    """Read a checking child's reports until it ends or ``deadline`` passes, and reap it.

    Returns:
        What it found, the stage it was importing when it ended (None if it was not), how it
        ended, and whether the deadline passed.
    """
    data, timed_out = _read_all(read_fd, pid, deadline)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    status = reaper.wait_for(pid)
    found: dict[str, StageCode] = {}
    importing = None
    for message in _reports(data):
        if "importing" in message:
            importing = message["importing"]
        else:
            found[message.pop("stage")] = _from_json(message)
            importing = None
    ended = f"exit code {status.code}" if status.signal is None else _signal_name(status.signal)
    return found, importing, ended, timed_out


# A checking child's reports: each is its length (4 bytes) and the ``marshal`` of a dict of plain
# values. The child is a fork of the same interpreter, so ``marshal`` reads what it wrote, and it
# is built in: ``json`` would be 2 ms more of every ``procd check``, which has no other use for it.


def _report(fd: int, message: dict[str, Any]) -> None:
    data = marshal.dumps(message)
    os.write(fd, len(data).to_bytes(4, "little") + data)


def _reports(data: bytes) -> Iterator[dict[str, Any]]:
    """The whole reports in ``data``; one cut off by the child's end (killed as it wrote) is left out."""
    at = 0
    while at + 4 <= len(data):
        end = at + 4 + int.from_bytes(data[at : at + 4], "little")
        if end > len(data):
            return
        yield marshal.loads(data[at + 4 : end])
        at = end


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _as_json(code: StageCode) -> dict[str, Any]:
    return {
        "problems": [[p.path, p.message] for p in code.problems],
        "code_hash": code.code_hash,
        "shardable": code.shardable,
        "path_options": list(code.path_options),
    }


def _from_json(message: dict[str, Any]) -> StageCode:
    return StageCode(
        tuple(Problem(path, text) for path, text in message["problems"]),
        message["code_hash"],
        message["shardable"],
        tuple(message["path_options"]),
    )


def _read_all(fd: int, pid: int, deadline: float) -> tuple[bytes, bool]:
    """Read what child ``pid`` writes to ``fd`` until it exits or ``deadline`` passes; return the
    bytes and whether time ran out. The child's exit ends the reading, not the end of the pipe:
    a process the stage code forked at import may hold the pipe open for ever."""
    chunks: list[bytes] = []
    pidfd = os.pidfd_open(pid)
    try:
        while True:
            left = deadline - time.monotonic()
            ready = select.select([fd, pidfd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                return b"".join(chunks), True
            if pidfd in ready:  # it has exited: what it wrote is all in the pipe
                os.set_blocking(fd, False)
                while chunk := _read_some(fd):
                    chunks.append(chunk)
                return b"".join(chunks), False
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks), False
            chunks.append(chunk)
    finally:
        os.close(pidfd)
        os.close(fd)


def _read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


def load_and_check(
    file: str, *, apart: bool, timeout_s: float = IMPORT_TIMEOUT_S
) -> tuple[PipelineSpec, list[Problem]]:
    """Load a pipeline file and check its stage code; return it with every problem found.

    The stage code is checked even when the file has other problems (so that every problem is
    listed at once), for the stages whose own keys could be read. The spec returned carries each
    stage's ``code_hash`` and ``shardable``, and its path options made absolute.

    Args:
        file: the pipeline file.
        apart: check in a forked child (``check_callables_apart``), not in this process.
        timeout_s: with ``apart``, how long the stage code may take to check.

    Raises:
        ConfigError: the file cannot be read or parsed at all.
    """
    spec, problems = config.read_pipeline(file)
    codes = check_callables_apart(spec, timeout_s) if apart else check_callables(spec)
    return complete(spec, codes, problems)


def complete(
    spec: PipelineSpec, codes: Mapping[str, StageCode], problems: list[Problem]
) -> tuple[PipelineSpec, list[Problem]]:
    """The spec with what the check found filled in (see ``load_and_check``), and the problems
    with the check's added. ``environment`` uses it for a check made in another interpreter."""
    stages = []
    for stage in spec.stages:
        code = codes.get(stage.name, StageCode())
        problems += [p for p in code.problems if not _covered(p, problems)]
        options = dict(stage.options)
        for key in code.path_options:
            import pathlib  # only a stage with path options needs it

            options[key] = pathlib.Path(spec.base_dir, options[key])
        stages.append(dataclasses.replace(stage, options=options, code_hash=code.code_hash, shardable=code.shardable))
    return dataclasses.replace(spec, stages=tuple(stages)), problems


def _covered(problem: Problem, found: list[Problem]) -> bool:
    """A problem of the code at a key whose value the file already got wrong says nothing new."""
    keys = [p.path for p in found if p.path.count(".") >= 2]  # a stage's own key, not the stage or the graph
    return any(problem.path == key or problem.path.startswith(key + ".") for key in keys)


def load_or_raise(file: str, *, apart: bool) -> PipelineSpec:
    """``load_and_check``, raising every problem found as one ``ConfigError``."""
    spec, problems = load_and_check(file, apart=apart)
    if problems:
        raise ConfigError(file, problems)
    return spec
