"""Orders and wires a validated pipeline: which stage starts and stops first, who writes where.

Pure: works on ``config`` specs only. Also renders the stage graph as DOT for ``procd graph``.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

from procd.config import PipelineSpec, StageSpec
from procd.frozen import frozen_dataclass


def topological_order(spec: PipelineSpec) -> tuple[StageSpec, ...]:
    """Return the stages upstream first (producers first), keeping file order among equals.

    The config layer has already rejected cycles, so every stage is placed.
    """
    placed: list[StageSpec] = []
    names: set[str] = set()
    remaining = list(spec.stages)
    while remaining:
        ready = [s for s in remaining if all(i in names for i in s.inputs)]
        if not ready:  # unreachable after validation; fail loudly rather than loop
            raise ValueError(f"cycle among {', '.join(s.name for s in remaining)}")
        for stage in ready:
            placed.append(stage)
            names.add(stage.name)
            remaining.remove(stage)
    return tuple(placed)


def outputs(spec: PipelineSpec, stage: StageSpec) -> tuple[str, ...]:
    """Names of the stages whose input queues ``stage`` writes to (empty for a sink)."""
    return tuple(s.name for s in spec.readers(stage.name))


def upstream_closure(spec: PipelineSpec, name: str) -> set[str]:
    """Every stage that feeds ``name``, directly or through others."""
    seen: set[str] = set()
    todo = list(spec.stage(name).inputs)
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(spec.stage(current).inputs)
    return seen


@frozen_dataclass(frozen=True)
class ReloadPlan:
    """What a reload does, stage by stage."""

    changed: frozenset[str]  # restart: its configuration, its wiring or its code changed
    added: frozenset[str]
    removed: frozenset[str]
    unchanged: frozenset[str]  # keep their processes
    replaced_queues: frozenset[str]  # a new input queue (the old one drains and goes)
    finished: frozenset[str]  # changed, but already finished: not started again
    code_changed: frozenset[str] = frozenset()  # among changed: the source of its modules changed


def reload_plan(
    old: PipelineSpec, new: PipelineSpec, finished: Set[str], rebuilt: Set[str] = frozenset()
) -> ReloadPlan:
    """Compare two versions of a pipeline.

    A stage's wiring is part of its configuration: a stage that gains or loses a reader, or one
    of whose readers gets a new queue, is restarted, since its processes hold the queues they
    write to from the moment they start. So is its code: a stage whose ``code_hash`` differs
    (the source of a module it imports from the pipeline's directory changed) is restarted, and
    so is every stage in ``rebuilt``, whose code comes from an environment that was rebuilt.
    """
    old_names, new_names = {s.name for s in old.stages}, {s.name for s in new.stages}
    kept = old_names & new_names
    replaced = {
        n
        for n in kept
        if old.stage(n).queue != new.stage(n).queue or old.stage(n).is_producer != new.stage(n).is_producer
    }

    def wiring(spec: PipelineSpec, name: str) -> tuple[Any, ...]:
        return (spec.stage(name), tuple(r.name for r in spec.readers(name)))

    changed = {n for n in kept if wiring(old, n) != wiring(new, n) or n in rebuilt}
    changed |= {upstream for n in replaced for upstream in new.stage(n).inputs if upstream in kept}
    done = {n for n in changed if n in finished}
    changed -= done
    code = {n for n in changed if old.stage(n).code_hash != new.stage(n).code_hash or n in rebuilt}
    return ReloadPlan(
        code_changed=frozenset(code),
        changed=frozenset(changed),
        added=frozenset(new_names - old_names),
        removed=frozenset(old_names - new_names),
        unchanged=frozenset(kept - changed - done),
        replaced_queues=frozenset(replaced),
        finished=frozenset(done),
    )


def to_dot(spec: PipelineSpec) -> str:
    """Render the stage graph in Graphviz DOT: one node per stage, one edge per input."""

    def quote(text: str) -> str:
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'

    lines = [f"digraph {quote(spec.name)} {{", "  rankdir=LR;"]
    for stage in topological_order(spec):
        kind = stage.function if stage.function is not None else " ".join(stage.command or ())
        label = f"{stage.name}\n{kind}\nx{stage.processes}"
        shape = "box" if stage.function is not None else "component"
        lines.append(f"  {quote(stage.name)} [shape={shape}, label={quote(label)}];")
    for stage in topological_order(spec):
        for upstream in stage.inputs:
            lines.append(f"  {quote(upstream)} -> {quote(stage.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
