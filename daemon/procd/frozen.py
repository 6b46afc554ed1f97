"""Frozen dataclasses that cost nothing to define: ``@frozen_dataclass(frozen=True)``.

A leaf module. To the type checker ``frozen_dataclass`` is ``dataclasses.dataclass`` itself, and
at run time a class it makes is a real dataclass (``dataclasses.fields``, ``replace``, ``asdict``,
``is_dataclass``, pattern matching by ``__match_args__``, pickling): only its methods differ.

Discussion: for each class, ``@dataclass(frozen=True)`` writes the source of ``__init__``,
``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__`` and ``__delattr__`` and compiles each one
(CPython 3.11). On the 2-core machines procd is measured on that is about 0.7 ms a class, and
procd's model defines twenty of them at import (the lifecycle's events and actions, the pipeline
specs): some 14 ms of every command that loads a pipeline (bench/README.md, "Start-up"). Here
every class shares one set of methods that read the class's fields, with the semantics of the
generated ones: positional or keyword arguments with defaults and default factories, equality
between instances of the same class on the fields that compare, a hash of the same, a ``repr``
of the fields that show, and ``dataclasses.FrozenInstanceError`` on assignment. They are a little
slower to call than generated code, which does not matter for objects made per lifecycle event or
per pipeline load, never per item.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["frozen_dataclass"]

# mypy reads the name: to it, ``frozen_dataclass`` is ``dataclass``, and ``Any`` is typing's (an
# import more at run time, 3 ms of ``procd status``, which imports this through ``errors``)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass as frozen_dataclass
    from typing import Any
else:

    def frozen_dataclass(*, frozen: bool) -> Callable[[type], type]:
        """``dataclass(frozen=True)``, with shared methods instead of generated ones."""
        if not frozen:
            raise TypeError("frozen_dataclass makes frozen dataclasses only: pass frozen=True")
        return _build


def _build(cls: type) -> type:
    cls = dataclasses.dataclass(init=False, repr=False, eq=False)(cls)  # fields only: nothing compiled
    fields = dataclasses.fields(cls)
    cls.__frozen_init__ = tuple((f.name, f.default, f.default_factory) for f in fields if f.init)  # type: ignore[attr-defined]
    cls.__frozen_compare__ = tuple(f.name for f in fields if f.compare)  # type: ignore[attr-defined]
    cls.__frozen_hash__ = tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash))  # type: ignore[attr-defined]
    cls.__frozen_repr__ = tuple(f.name for f in fields if f.repr)  # type: ignore[attr-defined]
    for name, method in _METHODS.items():
        setattr(cls, name, method)
    return cls


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    spec = cls.__frozen_init__
    if len(args) > len(spec):
        raise TypeError(f"{cls.__qualname__}() takes {len(spec)} positional arguments but {len(args)} were given")
    names = [name for name, _default, _factory in spec]
    for name in kwargs:
        if name not in names:
            raise TypeError(f"{cls.__qualname__}() got an unexpected keyword argument {name!r}")
        if names.index(name) < len(args):
            raise TypeError(f"{cls.__qualname__}() got multiple values for argument {name!r}")
    for position, (name, default, factory) in enumerate(spec):
        if position < len(args):
            value = args[position]
        elif name in kwargs:
            value = kwargs[name]
        elif default is not dataclasses.MISSING:
            value = default
        elif factory is not dataclasses.MISSING:
            value = factory()
        else:
            raise TypeError(f"{cls.__qualname__}() missing 1 required argument: {name!r}")
        object.__setattr__(self, name, value)


def _repr(self: Any) -> str:
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__frozen_repr__)
    return f"{type(self).__qualname__}({shown})"


def _eq(self: Any, other: Any) -> object:
    if other.__class__ is not self.__class__:
        return NotImplemented
    names = self.__frozen_compare__
    return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)


def _hash(self: Any) -> int:
    return hash(tuple(getattr(self, name) for name in self.__frozen_hash__))


def _frozen(self: Any, name: str, *_value: Any) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


_METHODS = {
    "__init__": _init,
    "__repr__": _repr,
    "__eq__": _eq,
    "__hash__": _hash,
    "__setattr__": _frozen,
    "__delattr__": _frozen,
}
