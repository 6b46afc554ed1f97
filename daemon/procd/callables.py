"""Finds a function stage's code: ``"module:attr"`` imported with the pipeline's directory first.

Used by ``procd check`` and ``procd run`` before any process starts (so an import error is a
config error, exit 78), and by each worker to get the object it calls.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

from procd.config import PipelineSpec
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
