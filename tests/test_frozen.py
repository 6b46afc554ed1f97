"""``frozen_dataclass``: real frozen dataclasses, built without compiling their methods."""

from __future__ import annotations

import dataclasses

import pytest

from procd.config import StageSpec
from procd.frozen import frozen_dataclass


@frozen_dataclass(frozen=True)
class _Pair:
    left: int
    right: list[int] = dataclasses.field(default_factory=list, compare=False, repr=False)


def test_defaults_factories_compare_and_repr_follow_the_fields() -> None:
    a, b = _Pair(1), _Pair(1, [2])
    assert a.right == [] and a.right is not _Pair(1).right  # a fresh list each time
    assert a == b and hash(a) == hash(_Pair(1))  # right does not compare, so it is not hashed
    assert repr(b) == "_Pair(left=1)"
    assert dataclasses.replace(b, left=3) == _Pair(3) and dataclasses.replace(b, left=3).right == [2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del a.left


def test_pipeline_specs_are_frozen_dataclasses() -> None:
    stage = StageSpec(name="s", function="m:f")
    assert stage.options == {} and stage.options is not StageSpec(name="s", function="m:f").options
    assert dataclasses.replace(stage, processes=3).processes == 3 and stage.processes == 1
    assert dataclasses.asdict(stage)["name"] == "s"
    with pytest.raises(TypeError, match="name"):
        StageSpec(function="m:f")  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.processes = 2  # type: ignore[misc]
