"""Operations: what the world outside the loop asks of procd and hears from it, served in the loop.

Owns the control socket and the optional metrics endpoint (their listeners and connections,
bounded by ``ops.connections``), one handler per command of ``ops.commands.COMMANDS``, sd_notify
(READY, STATUS, STOPPING, RELOADING and the watchdog ping, sent from the loop itself so that a
stuck loop sends nothing), the status line and a terminal's progress line, and ``status()``. The
protocols themselves live in ``procd.ops``; this part wires them to the supervisor's parts.

It never changes a worker slot or an input itself: a command that does hands the request to the
part that owns it (``stop`` to stopping, ``scale`` to the stage groups, ``reload`` to reload) and
answers with what that part says. Adding a command: its entry in ``ops.commands.COMMANDS``, its
client side in the CLI, and one handler here.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from typing import TYPE_CHECKING, Any

from procd import config
from procd.ops import control, status
from procd.ops.commands import ControlError
from procd.ops.connections import PAUSE_S, Connection, Listener
from procd.ops.control import Client, ControlServer
from procd.ops.notify import Notifier
from procd.supervisor import loop
from procd.supervisor.slots import WorkerSlot

if TYPE_CHECKING:
    from procd.ops.metrics import HttpClient, MetricsServer
    from procd.supervisor.core import Supervisor

# A message the service manager's queue had no room for is tried again this soon; at the end,
# procd waits this long at most for room for what it still keeps.
NOTIFY_RETRY_S = 0.05
NOTIFY_FINAL_WAIT_S = 1.0


class Operations:
    """The control socket, the metrics endpoint, sd_notify and the status views of one pipeline."""

    def __init__(self, sup: Supervisor, notifier: Notifier) -> None:
        self.sup = sup
        self.notifier = notifier
        self.notify_failed = False
        self.status_sent = ("", 0.0)  # the last STATUS= line and when it went
        self.listeners: dict[Listener, str] = {}  # the control socket and the metrics endpoint
        self.accepts: dict[Listener, loop.Handler] = {}  # how each accepts a connection
        self.watched: set[Listener] = set()  # those the loop watches (a paused one is not)
        self.connections: dict[Connection, Listener] = {}
        self.server: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self.watchdog = loop.Alarm(sup.loop, self._ping_watchdog)
        self.status_due = loop.Alarm(sup.loop, self.update_status)
        self.tend_due = loop.Alarm(sup.loop, self.tend)
        self.notify_retry = loop.Alarm(sup.loop, self._flush_notify)  # kept messages, tried again
        self.handlers: dict[str, control.Handler] = {  # one per command of commands.COMMANDS
            "status": lambda _request: {"ok": True, **self.status()},
            "stop": self._stop,
            "reload": lambda _request: sup.reloader.reload("control socket"),
            "scale": lambda request: sup.groups.scale(request.args["stage"], request.args["processes"]),
            "attach": lambda request: self._attach(request.args["stage"]),
            "replayed": self._replayed,
        }
        control.check_handlers(self.handlers)

    # -- opening and closing -----------------------------------------------------------------------

    def open(self) -> None:
        """Listen on the control socket, and for metrics if the pipeline asks.

        Raises:
            ControlError: a socket cannot be created (another procd runs this pipeline).
        """
        spec = self.sup.spec
        server = ControlServer(self.sup.control_path)
        try:
            if spec.metrics:
                from procd.ops.metrics import MetricsServer  # only a pipeline that asks serves metrics

                self.metrics = MetricsServer(*spec.metrics)
                self.listeners[self.metrics] = "metrics"
                self.accepts[self.metrics] = functools.partial(self._accept_http, self.metrics)
        except OSError as exc:
            server.close()
            address = config.format_address(spec.metrics) if spec.metrics else "?"
            raise ControlError(f"cannot listen for metrics on {address}: {exc.strerror}") from None
        self.server = server
        self.listeners = {server: "control", **self.listeners}
        self.accepts[server] = functools.partial(self._accept, server)
        if self.notifier.watchdog_interval_s:
            self.watchdog.set(self.sup.clock())
        self.tend()

    def close(self) -> None:
        self._flush_notify(final=True)
        for connection in self.connections:
            connection.close()
        if self.server is not None:
            self.server.close()
        if self.metrics is not None:
            self.metrics.close()

    # -- the service manager (sd_notify) -----------------------------------------------------------

    def notify(self, **fields: str | int) -> None:
        try:
            self.notifier.send(**fields)
        except OSError as exc:
            self._notify_failed(exc)
        self._retry_kept()

    def notify_reloading(self) -> None:
        try:
            self.notifier.reloading()
        except OSError as exc:
            self._notify_failed(exc)
        self._retry_kept()

    def _retry_kept(self) -> None:
        """The service manager's queue was full (see ``ops.notify``): try again shortly."""
        if self.notifier.pending and self.notify_retry.when is None:
            self.notify_retry.set(self.sup.clock() + NOTIFY_RETRY_S)

    def _flush_notify(self, final: bool = False) -> None:
        """Send the kept messages; at the end, wait a little for room (STOPPING=1 is among them),
        then let the rest go."""
        give_up_at = time.monotonic() + NOTIFY_FINAL_WAIT_S  # real time: it sleeps for real
        while True:
            try:
                if self.notifier.flush() or not final or time.monotonic() >= give_up_at:
                    break
            except OSError as exc:
                self._notify_failed(exc)
            time.sleep(NOTIFY_RETRY_S)  # procd is ending: nothing else waits on the loop
        if not final:
            self._retry_kept()

    def _notify_failed(self, exc: OSError) -> None:
        if not self.notify_failed:  # once: the service manager may simply be gone
            self.notify_failed = True
            self.sup.log.warning("notify_failed", error=exc.strerror, socket=self.notifier.address)

    def _ping_watchdog(self) -> None:
        self.notify(WATCHDOG=1)  # sent from the loop itself: a stuck loop sends nothing
        assert self.notifier.watchdog_interval_s is not None
        self.watchdog.set(self.sup.clock() + self.notifier.watchdog_interval_s)

    def ping_while_blocked(self) -> None:
        """Claiming the environment a reload's check prepared takes only its lock, unless it was
        removed in between and is built again here, in the loop: the service manager's watchdog
        must still hear from procd then."""
        if self.notifier.watchdog_interval_s:
            self.notify(WATCHDOG=1)

    def worker_ready(self, slot: WorkerSlot) -> None:
        """A worker has said it is ready; once every one has, so is the pipeline."""
        sup = self.sup
        sup.ready.add(slot)
        if not sup.ready_logged and len(sup.ready) == len(sup.slots):
            sup.ready_logged = True
            sup.log.info("pipeline_ready", workers=len(sup.slots))
            self.notify(READY=1, STATUS=self.status_line())

    def counted(self, slot: WorkerSlot) -> None:
        """A worker has reported its counts."""
        sup = self.sup
        sup.ledger.observe(slot)
        sup.ledger.sample(sup.slots, sup.clock())
        self.show_progress()

    def _rate(self) -> tuple[status.Totals, float]:
        sup = self.sup
        totals = sup.ledger.totals(sup.slots)
        return totals, status.sink_rate(sup.spec, sup.ledger.rates(totals, sup.clock())[0])

    def status_line(self) -> str:
        """One line for ``systemctl status``: stages, workers, items/s, restarts."""
        return status.summary_line(self.sup.spec, self.sup.slots, self._rate()[1])

    def show_progress(self) -> None:
        """On a terminal: items through each stage, and the rate, under the records."""
        writer = self.sup.writer
        if writer is not None and writer.on_terminal:
            totals, per_s = self._rate()
            writer.progress(status.progress_line(self.sup.spec, totals, per_s))

    def update_status(self) -> None:
        """Send STATUS= when the line changed, at most once a second."""
        if not self.notifier.enabled or not self.sup.ready_logged or self.sup.stopper.stopping:
            return
        line = self.status_line()
        last, when = self.status_sent
        if line == last:
            return
        now = self.sup.clock()
        if now - when < 1.0:
            if self.status_due.when is None:
                self.status_due.set(when + 1.0)
            return
        self.status_sent = (line, now)
        self.notify(STATUS=line)

    # -- the control socket and the metrics endpoint -----------------------------------------------

    def _accept(self, server: ControlServer, _events: int = 0) -> None:
        now = self.sup.clock()
        client, refused = server.accept(now)
        if refused is not None:
            self.sup.log.warning("control_refused", peer_pid=refused["pid"], peer_uid=refused["uid"])
        if client is not None:
            self.sup.loop.watch(client.fileno(), functools.partial(self._serve, client))
        self._accepted(server, client, now)

    def _accept_http(self, server: MetricsServer, _events: int = 0) -> None:
        now = self.sup.clock()
        client = server.accept(now)
        if client is not None:
            self.sup.loop.watch(client.fileno(), functools.partial(self._serve_http, client))
        self._accepted(server, client, now)

    def _accepted(self, listener: Listener, connection: Connection | None, now: float) -> None:
        if connection is not None:
            self.connections[connection] = listener
        elif listener.paused_until > now:
            self.sup.log.warning(
                "connections_paused",
                endpoint=self.listeners[listener],
                message=f"no descriptor to spare for a new connection; accepting again in {PAUSE_S:g}s",
            )

    def _serve(self, client: Client, mask: int) -> None:
        """Answer the requests a client sent, as long as it reads the replies."""
        now = self.sup.clock()
        if mask & loop.READ and not client.closing and not client.receive(now):
            self._drop(client)
            return
        while True:
            while client.pending is None and not client.full and not client.closing:
                request = client.next_request()
                if request is None:
                    break
                answer = self.answer(request)
                if isinstance(answer, control.Deferred):
                    client.pending = answer  # its later requests wait for this reply
                    answer.then(functools.partial(self._deferred_reply, client))
                else:
                    client.reply(answer)
            done = client.flush(now)
            if not done or client.full or client.closing or client.pending or b"\n" not in client.inbox:
                break
        if done and client.closing:
            self._drop(client)
            return
        reading = 0 if client.full or client.closing or client.pending else loop.READ
        self.sup.loop.modify(client.fileno(), reading | (0 if done else loop.WRITE))

    def _deferred_reply(self, client: Client, reply: control.Reply) -> None:
        """A reply that was deferred is known: send it, then serve what the client sent since."""
        if client not in self.connections:
            return  # dropped meanwhile
        client.pending = None
        client.reply(reply)
        self._serve(client, 0)

    def _serve_http(self, client: HttpClient, mask: int) -> None:
        now = self.sup.clock()
        if mask & loop.READ and not client.closing:
            path = client.read_request(now)
            if path is None:
                self._drop(client)
                return
            if path:
                client.respond(path, self.status())
        if client.closing:
            if client.flush(now):
                self._drop(client)
            else:
                self.sup.loop.modify(client.fileno(), loop.WRITE)

    def _drop(self, connection: Connection) -> None:
        self.sup.loop.forget(connection.fileno())
        connection.close()
        self.connections.pop(connection).release()

    def tend(self) -> None:
        """Drop connections idle past their deadline (a peer that does not read its replies
        among them); watch each listener only while it accepts; keep the next such moment."""
        now = self.sup.clock()
        for connection in [c for c in self.connections if c.deadline <= now]:
            self.sup.log.info(
                "connection_dropped",
                endpoint=self.listeners[self.connections[connection]],
                unsent_bytes=len(connection.outbox),
                message=f"no progress for {connection.patience_s:g}s"
                + ("; the peer does not read its replies" if connection.outbox else ""),
            )
            self._drop(connection)
        for listener, accept in self.accepts.items():
            accepting = listener.accepting(now)
            if accepting and listener not in self.watched:
                self.sup.loop.watch(listener.fileno(), accept)
                self.watched.add(listener)
            elif not accepting and listener in self.watched:
                self.sup.loop.forget(listener.fileno())
                self.watched.discard(listener)
        moments = [c.deadline for c in self.connections if math.isfinite(c.deadline)]  # not one owed a reply
        moments += [listener.paused_until for listener in self.listeners if listener.paused_until > now]
        if moments:
            self.tend_due.set(min(moments))
        else:
            self.tend_due.clear()

    def answer(self, request: control.Request | str) -> control.Answer:
        """The reply to one request; signals and requests lead to the same internal events."""
        try:
            return control.dispatch(request, self.handlers)
        except Exception as exc:  # a fault of procd's own: told to the client, never fatal
            name = request.command.name if isinstance(request, control.Request) else None
            self.sup.log.error("control_failed", command=name, error=repr(exc), traceback=traceback.format_exc())
            return {"ok": False, "error": f"procd failed to answer {name}: {exc!r}"}

    # -- the handlers --------------------------------------------------------------------------------

    def _stop(self, _request: control.Request) -> dict[str, Any]:
        self.sup.stopper.request("stop requested over the control socket")
        return {"ok": True, "stopping": True}

    def _replayed(self, request: control.Request) -> dict[str, Any]:
        self.sup.log.info("items_replayed", **request.args)
        return {"ok": True}

    def _attach(self, name: object) -> tuple[dict[str, Any], tuple[int, ...]]:
        """Hand a client the writing end of a stage's input (``procd dlq replay``). The stage's
        end of stream then also waits for that client to close it."""
        channels = self.sup.wiring.channels
        channel = channels.get(name) if isinstance(name, str) else None
        if channel is None:
            readers = sorted(channels)
            return {
                "ok": False,
                "error": f"no stage {name!r} with an input; stages with one are {', '.join(readers)}",
            }, ()
        if channel.ended or self.sup.stopper.stopping:
            return {"ok": False, "error": f"the input of stage {name} has ended; it takes no more items"}, ()
        self.sup.log.info("input_attached", stage=name)
        fields, fds = channel.attach()
        return {"ok": True, "stage": name, "batch": channel.spec.batch, "slots": channel.spec.slots, **fields}, fds

    def status(self) -> dict[str, Any]:
        """Every stage and worker as ``procd status`` shows them."""
        sup = self.sup
        now = sup.clock()
        reply = status.snapshot(
            sup.spec,
            sup.slots,
            sup.wiring.channels,
            sup.ledger,
            finished=sup.groups.finished,
            dead_letters=sup.dead_letters,
            stopping=sup.stopper.stopping,
            uptime_s=now - sup.started_at,
            now=now,
        )
        reply["transport_unavailable"] = sorted(sup.wiring.transport_down)  # inputs whose server is away
        return reply
