"""A consumer's outputs on the hot path: which input item an output that cannot be sent came from
(``Outlet``'s per-output sources and multi-output groups), and the stage code called through its
``__call__`` bound once (``function._bound_call``). In one process, over a real local queue."""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Iterator
from typing import Any

import pytest

from procd import transport
from procd.config import QueueSpec
from procd.context import Output
from procd.transport import Input
from procd.transport.local import LocalEndpoint
from procd.worker.function import _Attempts, _bound_call, _caller
from procd.worker.outlet import ITSELF, Outlet


@pytest.fixture
def queue() -> Iterator[Input]:
    made = transport.create("q", QueueSpec(maxsize=1000, batch=1000))
    yield made
    made.close()


def received(made: Input) -> list[Any]:
    """Every item sent to ``made`` so far (the end of stream is given here: every writer has let
    go of its copy of the writing end)."""
    made.end()
    endpoint = made.endpoint()
    assert isinstance(endpoint, LocalEndpoint)
    reader = dataclasses.replace(endpoint, read_fd=os.dup(endpoint.read_fd)).reader()
    items: list[Any] = []
    for batch in reader:
        items += batch
    reader.close()
    return items


def outlet_to(made: Input, set_aside: list[tuple[Any, str]]) -> Outlet:
    """An outlet writing to ``made`` through its own copy of the writing end (as a worker has)."""
    endpoint = made.endpoint()
    assert isinstance(endpoint, LocalEndpoint)
    own = dataclasses.replace(endpoint, write_fd=os.dup(endpoint.write_fd))
    return Outlet((Output(own, 1000, "next"),), None, lambda item, why: set_aside.append((item, why)))


def unpicklable() -> Any:
    return lambda: 1


def test_only_the_outputs_of_the_attempt_that_made_an_unsendable_one_are_set_aside(queue: Input) -> None:
    set_aside: list[tuple[Any, str]] = []
    outlet = outlet_to(queue, set_aside)
    shared = {"shared": True}  # attempted twice in one batch, as a pickle with shared references gives it
    many = {"many": True}
    outlet.add("alone-1")  # stands for itself
    outlet.hand_on("a", ["a-out"])
    outlet.hand_on(shared, ["shared-first"])
    outlet.hand_on(many, ["many-1", unpicklable(), "many-3"])
    outlet.hand_on("b", ["b-1", "b-2"])
    outlet.hand_on(shared, [unpicklable()])
    outlet.add(unpicklable())  # stands for itself: set aside alone
    outlet.hand_on(ITSELF, ["itself-1", "itself-2"])
    outlet.hand_on("c", ["c-out"])
    outlet.close()
    assert received(queue) == ["alone-1", "a-out", "shared-first", "b-1", "b-2", "itself-1", "itself-2", "c-out"]
    assert [item for item, _why in set_aside[:2]] == [many, shared]
    assert callable(set_aside[2][0])
    assert all("cannot be sent to stage next" in why for _item, why in set_aside)
    assert outlet.count == 8


def test_an_unsendable_output_in_a_batch_of_single_results_sets_aside_its_item_alone(queue: Input) -> None:
    set_aside: list[tuple[Any, str]] = []
    outlet = outlet_to(queue, set_aside)
    ctx: Any = types.SimpleNamespace(stage=types.SimpleNamespace(max_attempts=1))

    def stage(n: int) -> Any:
        if n == 3:
            return (x for x in (30, unpicklable()))  # a generator: two outputs of one attempt
        return unpicklable() if n in (5, 8) else (None if n == 6 else n * 10)

    attempts = _Attempts(ctx, stage, outlet, None, None)  # type: ignore[arg-type]
    attempts.batch(list(range(10)))
    outlet.close()
    assert received(queue) == [0, 10, 20, 40, 70, 90]
    assert [item for item, _why in set_aside] == [3, 5, 8]


class Doubles:
    def __call__(self, item: int) -> int:
        return item * 2


class Triples(Doubles):
    def __call__(self, item: int) -> int:
        return item * 3


class Static:
    __call__ = staticmethod(lambda item: item + 1)


class Inherits(Triples):
    pass


def test_the_bound_call_is_what_calling_the_instance_calls() -> None:
    for instance in (Doubles(), Triples(), Static(), Inherits()):
        call = _caller(type(instance), instance, {})
        assert call is not instance and call(7) == instance(7)
    shadowed = Doubles()
    shadowed.__call__ = lambda item: "instance attribute"  # type: ignore[method-assign]
    assert _bound_call(shadowed)(7) == 14 == shadowed(7)  # calling an instance never reads its own dict


def test_a_call_that_is_not_a_plain_function_is_left_to_the_instance() -> None:
    partial_like = types.SimpleNamespace()
    assert _bound_call(partial_like) is partial_like  # not callable: calling it fails as it did

    class Removed(Doubles):
        __call__ = None  # type: ignore[assignment]

    removed = Removed()
    assert _bound_call(removed) is removed
    with pytest.raises(TypeError):
        _bound_call(removed)(1)
