"""Modules put into ``sys.modules`` before they are needed, whose code runs on first use.

A leaf module (core layer): it imports nothing of the package. Its one piece of state, the set
of deferred modules running right now, is process-wide on purpose: ``sys.modules`` is.

Discussion: a few standard modules cost a procd command tens of milliseconds at import and are
imported only for something procd never does: ``structlog.stdlib`` and ``structlog._native``
import asyncio (with ssl and libcrypto) for ``async`` methods; ``dataclasses`` imports
``inspect`` (with ``ast``, ``dis``, ``tokenize``, about 12 ms) only to write a docstring for a
class that has none (bench/README.md, "Start-up"). There is no way to import a part of a
package without its ``__init__``, and ``importlib.util.LazyLoader`` does not help on 3.11 (the
import system reads ``__spec__`` of a module found in ``sys.modules``, which makes a lazy module
load at once). So ``defer`` puts a module object into ``sys.modules`` that has its spec but has
not run yet; the first attribute anyone reads from it that it lacks (``asyncio.run``, ``from
inspect import signature``, ``import asyncio.subprocess``, which reads ``__path__``) runs the
module's own code into that same object, and from then on it is that module. Code that uses it
later (a stage in a worker forked from the supervisor, stage code imported by ``procd check``)
gets it the same way, at its first use instead of at procd's start.
"""

from __future__ import annotations

import _thread
import sys
import types

TYPE_CHECKING = False  # mypy reads the name; ``typing`` is an import more (4 ms) at run time
if TYPE_CHECKING:
    from typing import Any

__all__ = ["defer"]


class _Deferred(types.ModuleType):
    """A module in ``sys.modules`` whose code has not run yet: it runs on the first read of an
    attribute the object does not have (see the module's Discussion)."""

    def __getattr__(self, name: str) -> Any:
        with _LOCK:  # another thread reading it meanwhile waits for the run to finish
            if type(self) is _Deferred and id(self) not in _RUNNING:
                _run(self)
            elif type(self) is _Deferred:  # read by its own code while it runs: as a plain import
                raise AttributeError(f"partially initialized module {self.__name__!r} has no attribute {name!r}")
        return getattr(self, name)


_LOCK = _thread.RLock()  # ``_thread``, built in: ``threading`` would be an import more
_RUNNING: set[int] = set()


def _run(module: types.ModuleType) -> None:
    """Run a deferred module's code into it; if that fails, it leaves ``sys.modules`` (as a
    failed import does) and the error propagates."""
    spec = module.__spec__
    assert spec is not None and spec.loader is not None
    if spec.submodule_search_locations is not None:
        module.__path__ = spec.submodule_search_locations
    _RUNNING.add(id(module))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    finally:
        _RUNNING.discard(id(module))
    module.__class__ = types.ModuleType


def defer(name: str) -> None:
    """Put the top-level module ``name`` into ``sys.modules`` unrun, to run on first use; nothing
    if it is there already (run or not) or cannot be found.

    Without ``__path__`` until it runs, so that importing one of its submodules runs the package
    first, in its own order, as a plain import would."""
    if name in sys.modules:
        return
    # What ``importlib.util.find_spec`` and ``module_from_spec`` call, from the import system's
    # own bootstrap, which is always loaded: ``importlib.util`` would import ``contextlib`` and
    # more (5 ms) into every command.
    from importlib import _bootstrap

    spec = _bootstrap._find_spec(name, None)  # type: ignore[attr-defined]  # not in the stubs
    if spec is None or spec.loader is None:
        return
    module = _bootstrap.module_from_spec(spec)
    module.__dict__.pop("__path__", None)
    module.__class__ = _Deferred
    sys.modules[name] = module
