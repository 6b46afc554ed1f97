"""Reload: from a request (SIGHUP or the control socket) to an applied ``plan.ReloadPlan``.

Owns the reload under way (one at a time): its check child (``launch.reloadcheck``: the new file's
stage code imported, an environment built, in a child the loop watches, with a deadline that fails
the reload and never procd), the deferred reply, and the processes of a check killed at its
deadline, left for the reaper. It owns the environments a reload replaced too: each is held while a
worker still runs in it, then released and removed.

``apply`` makes a new spec the running pipeline (scale's resharding uses it as well): the changed
and removed stages' slots leave (readers finish their batch; a slot whose process has ended leaves
at once), the changed and added stages' start, paced by the stage groups; the inputs are swapped
by the wiring. It never changes a slot's state itself: it feeds the slot driver events and the
transition table decides.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from procd import config, plan, reaper, transport
from procd.config import PipelineSpec
from procd.errors import ConfigError, Problem, StoreError
from procd.lifecycle import Exited, Leave, RetireRequested
from procd.ops import control
from procd.supervisor import loop
from procd.supervisor.slots import TERMINAL, WorkerSlot
from procd.transport import Input

# The environment builder and the reload check (with hashlib and libcrypto, subprocess) are
# imported where a reload uses them, not into every supervisor and the workers forked from it
# (bench/README.md, "Start-up").
if TYPE_CHECKING:
    from procd.launch import reloadcheck
    from procd.launch.environment import BuildError, Environment
    from procd.supervisor.core import Supervisor


@dataclasses.dataclass
class Reloading:
    """A reload whose check of the new file runs (``reloadcheck``); its reply waits for it."""

    check: reloadcheck.Check
    source: str
    reply: control.Deferred
    timeout_s: float


class Reloader:
    """Reloads of one pipeline, one at a time, and the environments they retire."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.reloading: Reloading | None = None  # a reload waiting for its check
        self.checks_killed: set[int] = set()  # processes of a check killed at its deadline, to reap
        self.retired_envs: list[Environment] = []  # replaced by a reload; held while workers run in them
        self.due = loop.Alarm(sup.loop, self._timed_out)

    def reload(self, source: str) -> control.Answer:
        """Re-read the pipeline file and apply the difference once its stage code is checked.

        Stages whose effective configuration is unchanged keep their processes. A changed stage's
        processes are replaced (readers finish their batch first); a new stage starts; a removed
        one drains and goes. A stage's wiring is part of its configuration: a stage that gains or
        loses a reader, or whose reader's queue is replaced, is restarted to write to the right
        queues. An invalid file changes nothing. A finished stage is not started again.

        The check of the stage code (imports, an environment's build) runs in a child that the
        loop watches (``reloadcheck``): the reply is deferred until it ends, and the loop serves
        everything else meanwhile. A check that takes longer than ``pipeline.reload_timeout``
        is killed and fails the reload; one reload runs at a time.
        """
        sup = self.sup
        sup.log.info("reload_requested", source=source)
        if sup.stopper.stopping:
            return {"ok": False, "error": "the pipeline is stopping"}
        if self.reloading is not None:
            return {
                "ok": False,
                "error": (
                    f"a reload is under way already (requested by {self.reloading.source}); try again once it has ended"
                ),
            }
        sup.operations.notify_reloading()
        try:
            new, problems = config.read_pipeline(sup.spec.file)
        except ConfigError as error:
            return self._reloaded(self._invalid(error))
        if problems and new.has_environment:  # a file with problems builds nothing
            return self._reloaded(self._invalid(ConfigError(sup.spec.file, problems)))
        timeout_s = sup.spec.reload_timeout_s
        from procd.launch import reloadcheck

        try:
            # the child's own waits are longer: the loop's deadline is what ends a check
            check = reloadcheck.start(new, problems, f"procd: {sup.spec.name} reload check", 2 * timeout_s + 1)
        except OSError as exc:
            sup.log.error("reload_failed", cause="fork", error=exc.strerror, message="still running unchanged")
            return self._reloaded({"ok": False, "error": f"cannot start the check: {exc.strerror}; nothing changed"})
        self.reloading = Reloading(check, source, control.Deferred(), timeout_s)
        sup.loop.watch(check.fd, lambda _events: self._read_check(check))
        self.due.set(sup.clock() + timeout_s)
        return self.reloading.reply

    def _reloaded(self, reply: dict[str, Any]) -> dict[str, Any]:
        """A reload has ended, with ``reply``: the service manager hears READY again."""
        self.sup.operations.notify(READY=1, STATUS=self.sup.operations.status_line())
        return reply

    def _read_check(self, check: reloadcheck.Check) -> None:
        if self.reloading is None or self.reloading.check is not check:
            return  # ended earlier in this turn of the loop
        if not check.read():  # its end of the pipe has closed: its exit (SIGCHLD) comes next
            self.sup.loop.forget(check.fd)

    def _end_check(self) -> Reloading:
        """Forget the running check (its descriptor closed, its deadline gone); return it."""
        assert self.reloading is not None
        pending, self.reloading = self.reloading, None
        self.due.clear()
        self.sup.loop.forget(pending.check.fd)
        return pending

    def checked(self, reaped: reaper.Reaped) -> None:
        """The check has exited: apply the reload, answer it."""
        assert self.reloading is not None
        ended = f"exit code {reaped.code}" if reaped.signal is None else Exited(None, reaped.signal).describe()
        outcome = self.reloading.check.outcome(ended)
        pending = self._end_check()
        pending.check.close()
        if self.sup.stopper.stopping:
            reply: dict[str, Any] = {"ok": False, "error": "the pipeline is stopping; nothing changed"}
        else:
            reply = self._apply_outcome(outcome)
        pending.reply.resolve(self._reloaded(reply))

    def _timed_out(self) -> None:
        """The check has run past ``pipeline.reload_timeout``: kill it, fail the reload."""
        pending = self._end_check()
        self.checks_killed |= pending.check.kill()
        pending.check.close()
        what = f"checking the new pipeline file did not finish within {pending.timeout_s:g}s (pipeline.reload_timeout)"
        self.sup.log.error(
            "reload_failed",
            cause="timeout",
            timeout_s=pending.timeout_s,
            source=pending.source,
            message=f"{what}; still running unchanged",
        )
        pending.reply.resolve(self._reloaded({"ok": False, "error": f"{what}; nothing changed"}))

    def abandon(self, why: str) -> None:
        """A stop (or the end of procd) while a check runs: kill it, answer the reload."""
        if self.reloading is None:
            return
        pending = self._end_check()
        self.checks_killed |= pending.check.kill()
        pending.check.close()
        self.sup.log.warning(
            "reload_failed", cause="stopping", source=pending.source, message=f"{why}; reload abandoned"
        )
        pending.reply.resolve({"ok": False, "error": f"{why}; the reload was abandoned, nothing changed"})

    def _invalid(self, error: ConfigError) -> dict[str, Any]:
        problems = error.lines()
        self.sup.log.error(
            "config_invalid", file=self.sup.spec.file, problems=problems, message="still running unchanged"
        )
        return {"ok": False, "error": "the pipeline file is invalid; nothing changed", "problems": problems}

    def _build_failed(self, error: BuildError) -> dict[str, Any]:
        self.sup.log.error(
            "environment_build_failed",
            project=error.project,
            error=str(error),
            output_tail=error.tail,
            message="still running unchanged",
        )
        return {"ok": False, "error": f"{error}; nothing changed", "output_tail": error.tail}

    def _apply_outcome(self, outcome: reloadcheck.Outcome) -> dict[str, Any]:
        """Apply what the check found (``reload``)."""
        sup = self.sup
        if outcome.build_error is not None:
            return self._build_failed(outcome.build_error)
        new, problems = outcome.spec, outcome.problems
        if new.name != sup.spec.name:
            problems.append(Problem("pipeline.name", f'cannot change while running (it is "{sup.spec.name}")'))
        if sup.spec.here is not None:  # the host runs the same stages (procd run --stages)
            new, selection = config.select_stages(new, sorted(sup.spec.here))
            problems.extend(selection)
        if problems:
            return self._invalid(ConfigError(sup.spec.file, problems))
        new_env = None
        if outcome.prepared is not None:
            from procd.launch import environment
            from procd.launch.environment import BuildError

            try:
                # complete since the check prepared it: this takes this process's claim on it
                new_env = environment.prepare(new, tick=sup.operations.ping_while_blocked)
            except BuildError as error:
                return self._build_failed(error)
            new_env = dataclasses.replace(new_env, built=outcome.prepared.built, seconds=outcome.prepared.seconds)
        old_env = sup.environment
        switching = (old_env.key if old_env else None) != (new_env.key if new_env else None)
        rebuilt = {s.name for s in sup.spec.stages if s.function is not None} if switching else set()
        diff = plan.reload_plan(sup.spec, new, sup.groups.finished, rebuilt)
        if switching:
            sup.environment = new_env  # the workers started from now on run in it
            sup.close_forkserver()  # it forks from the old interpreter; the next spawn starts another
        try:
            self.apply(new, diff)
        except StoreError as exc:
            sup.environment = old_env
            if new_env is not None:
                new_env.release()
            sup.log.error("config_invalid", file=sup.spec.file, problems=[str(exc)], message="still running unchanged")
            return {"ok": False, "error": "a new queue cannot be made; nothing changed", "problems": [str(exc)]}
        if switching:
            self._retire_environment(old_env, new_env, outcome.prepared.projects if outcome.prepared else ())
        elif new_env is not None:
            new_env.release()  # the same environment: this process's first claim on it stands
        fields = {
            "changed": sorted(diff.changed),
            "code_changed": sorted(diff.code_changed),
            "added": sorted(diff.added),
            "removed": sorted(diff.removed),
            "unchanged": sorted(diff.unchanged),
        }
        sup.log.info("pipeline_reloaded", **fields, not_restarted_finished=sorted(diff.finished))
        return {"ok": True, **fields}

    def apply(self, new: PipelineSpec, diff: plan.ReloadPlan) -> tuple[list[WorkerSlot], list[WorkerSlot]]:
        """Make ``new`` the running pipeline: the changed and removed stages' processes leave
        (readers finish their batch), the changed and added stages' start (paced); return both.

        Raises:
            StoreError: a new durable queue cannot be made (then nothing has changed).
        """
        sup = self.sup
        changed, added, removed, replaced_queues = diff.changed, diff.added, diff.removed, diff.replaced_queues
        fresh: dict[str, Input] = {}
        try:
            for name in added | (changed & replaced_queues):
                if not new.stage(name).is_producer:
                    fresh[name] = transport.create(name, new.stage(name).queue)
        except StoreError:
            for channel in fresh.values():
                channel.close()
            raise
        sup.spec = new
        sup.groups.adopt(new)
        sup.wiring.replace(fresh, removed | (changed & replaced_queues))

        going = [s for s in sup.slots if s.stage.name in removed | changed]
        leaving = [s for s in going if s.state not in TERMINAL]  # those with a process to end
        generations = {(s.stage.name, s.index): s.generation for s in sup.slots}
        arriving = [
            WorkerSlot(stage, i, generation=generations.get((stage.name, i), 0))
            for stage in plan.topological_order(new)
            if stage.name in added | changed
            for i in range(stage.processes)
        ]
        sup.slots += arriving
        sup.groups.finished -= changed
        for slot in going:
            if slot.state in TERMINAL:
                # it leaves through the driver too: what its slot file holds is counted, and a
                # slot waiting for its rest_for_one group is not started again with it
                sup.driver.feed(slot, RetireRequested())
        for slot in leaving:
            if slot.stage.is_producer:
                sup.driver.feed(slot, RetireRequested(Leave.AT_ONCE))
            elif slot.input is not None and not slot.input.current:
                sup.driver.feed(slot, RetireRequested(Leave.AT_END))  # its queue is going: read it to the end
            else:
                sup.driver.feed(slot, RetireRequested())  # its queue stays: the new readers go on
        sup.groups.start_paced(list(reversed(arriving)))
        return leaving, arriving

    def _retire_environment(self, old: Environment | None, new: Environment | None, projects: tuple[str, ...]) -> None:
        """Record the switch to ``new``; ``old`` is kept until no worker runs in it any more
        (``release_environments``)."""
        if new is not None:
            self.sup.log.info(
                "environment_built" if new.built else "environment_reused",
                path=new.path,
                projects=list(projects),
                seconds=round(new.seconds, 3),
            )
        if old is not None:
            self.retired_envs.append(old)

    def release_environments(self) -> None:
        """Give up every replaced environment no worker runs in any more, and remove it."""
        if not self.retired_envs:
            return
        sup = self.sup
        for pid in [pid for pid in sup.env_of if pid not in sup.by_pid]:
            del sup.env_of[pid]
        in_use = {id(env) for env in sup.env_of.values()}
        for env in [e for e in self.retired_envs if id(e) not in in_use]:
            self.retired_envs.remove(env)
            env.release()
            from procd.launch import environment

            keep = sup.environment.key if sup.environment is not None else ""
            for path in environment.remove_unused(sup.spec, keep=keep):
                sup.log.info("environment_removed", path=path)
