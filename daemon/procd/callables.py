"""Finds a function stage's code: ``"module:attr"`` imported with the pipeline's directory first.

Used by ``procd check`` and ``procd run`` before any process starts (so an import error is a
config error, exit 78), and by each worker to get the object it calls.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from typing import Any

from procd import reaper
from procd.config import PipelineSpec, load_pipeline
from procd.errors import Problem


class ResolveError(Exception):
    """The module or the attribute cannot be had; the message says which and why."""


def resolve(ref: str, base_dir: str) -> Any:
    """Import ``module`` from ``"module:attr"`` and return ``attr``.

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
    except Exception as exc:  # any error raised by user code at import time
        where = traceback.extract_tb(exc.__traceback__)[-1]
        detail = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, ModuleNotFoundError):
            detail += f" (at {where.filename}:{where.lineno})"
        raise ResolveError(f'cannot import module "{module_name}": {detail}') from None
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ResolveError(f'module "{module_name}" has no attribute "{attr_path}"') from None
    if not callable(target):
        raise ResolveError(f'"{ref}" is a {type(target).__name__}, not a function or class')
    return target


def accepts(target: Any, name: str) -> bool:
    """True if calling ``target`` (a function, or a class through its ``__init__``) takes a
    keyword argument called ``name``."""
    import inspect  # only producers ask, once per process

    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def is_class(target: Any) -> bool:
    """Classes are instantiated once per worker; functions are called directly."""
    return isinstance(target, type)


def check_callables(spec: PipelineSpec) -> list[Problem]:
    """Import every function stage's code; return one problem per stage that fails."""
    problems = []
    for stage in spec.stages:
        if stage.function is None:
            continue
        try:
            resolve(stage.function, spec.base_dir)
        except ResolveError as exc:
            problems.append(Problem(f"stages.{stage.name}.function", str(exc)))
    return problems


def load_and_check(file: str, *, apart: bool) -> tuple[PipelineSpec, list[Problem]]:
    """Load a pipeline file and import its stage code; return it with the import problems.

    Args:
        file: the pipeline file.
        apart: import in a forked child (``check_callables_apart``), not in this process.

    Raises:
        ConfigError: the file cannot be read or is invalid (before any import is tried).
    """
    spec = load_pipeline(file)
    return spec, (check_callables_apart if apart else check_callables)(spec)


def check_callables_apart(spec: PipelineSpec) -> list[Problem]:
    """``check_callables`` in a forked child, so that the caller never imports user code.

    The supervisor uses this: a module imported in the supervisor would be inherited by every
    forked worker, so a reload could never load new code, and a module that starts threads at
    import would make every later fork unsafe.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            problems = [[p.path, p.message] for p in check_callables(spec)]
            os.write(write_fd, json.dumps(problems).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with open(read_fd, "rb") as fh:
        data = fh.read()
    status = reaper.wait_for(pid)
    if status.code != 0 or not data:
        return [Problem("", f"checking the stage code failed (the check process ended with {status})")]
    return [Problem(path, message) for path, message in json.loads(data)]
