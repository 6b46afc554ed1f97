"""``procd logs`` and ``procd dlq``: procd's records and a stage's dead letters read back, shown,
summed up, and dead letters fed into a stage again.

Apart from the rest of the command line so that the other commands do not compile it (these
machines set ``PYTHONDONTWRITEBYTECODE=1``; bench/README.md, "Start-up").
"""

from __future__ import annotations

import sys

from procd.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

TYPE_CHECKING = False  # mypy reads the name; the imports below are for annotations only
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator
    from typing import Any


def dlq_list(file: str, as_json: bool) -> int:
    import json

    from procd.transport import deadletters

    try:
        records = list(deadletters.read(file))
    except OSError as exc:
        print(f"procd dlq list: cannot read {file}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    skipped = 0
    for number, entry in records:
        if entry is None:
            skipped += 1
        elif as_json:
            print(json.dumps(entry))
        else:
            if "item" in entry:
                item = json.dumps(entry["item"], ensure_ascii=False, separators=(",", ":"))
            else:
                item = f"(repr, not JSON) {entry.get('item_repr', '?')}"
            error = f"{entry.get('error_type')}: {entry.get('error')}"
            print(
                f"{number:>5}  {entry.get('ts', '?')}  {entry.get('stage', '?')}  "
                f"attempts {entry.get('attempts', '?')}  {error}  item {item[:120]}"
            )
    good = len(records) - skipped
    print(
        f"{good} dead letters" + (f"; {skipped} lines are not dead-letter records (skipped)" if skipped else ""),
        file=sys.stderr,
    )
    return EXIT_OK


def _replayable(file: str) -> tuple[list[Any], list[str]]:
    from procd.transport import deadletters

    items: list[Any] = []
    refused: list[str] = []
    for number, entry in deadletters.read(file):
        if entry is None:
            refused.append(f"line {number}: not a dead-letter record")
            continue
        ok, value = deadletters.item_of(entry)
        if ok:
            items.append(value)
        else:
            refused.append(f"line {number}: {value}")
    return items, refused


def dlq_replay(args: argparse.Namespace) -> int:
    from procd.errors import StoreError
    from procd.ops import commands
    from procd.ops.commands import ControlError

    try:
        items, refused = _replayable(args.file)
    except OSError as exc:
        print(f"procd dlq replay: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    for reason in refused:
        print(f"procd dlq replay: skipped {reason}", file=sys.stderr)
    if args.pipeline:
        from procd.cli import running  # a supervisor of its own

        return running.replay_fresh(args.pipeline, args.file, args.into)
    try:
        path = commands.find_socket(args.name, args.control)
        reply, fds = commands.call_fds(path, "attach", stage=args.into)
        if not reply.get("ok"):
            print(f"procd dlq replay: {reply.get('error')}", file=sys.stderr)
            return EXIT_FAILURE
        from procd import transport

        writer = transport.attached_writer(reply, fds)
        batch = int(reply["batch"])
        try:
            for start in range(0, len(items), batch):
                writer.send(items[start : start + batch])
        except (StoreError, OSError) as exc:
            print(f"procd dlq replay: cannot write into {args.into}: {exc}; nothing more was sent", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            writer.close()
        commands.call(path, "replayed", stage=args.into, items=len(items), file=args.file)
    except ControlError as exc:
        print(f"procd dlq replay: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"replayed {len(items)} items into {args.into}")
    return EXIT_OK


def logs(args: argparse.Namespace) -> int:
    import json
    import re
    import time

    from procd import events, log  # only this command reads records back

    now = time.time()
    try:
        keep = events.Filter(
            stage=args.stage,
            worker=args.worker,
            events=frozenset(e.strip() for group in args.event for e in group.split(",") if e.strip()),
            level=args.level,
            pid=args.pid,
            since=events.parse_when(args.since, now) if args.since else None,
            until=events.parse_when(args.until, now) if args.until else None,
        )
    except ValueError as exc:
        print(f"procd logs: --since/--until take a duration (10m) or an ISO time: {exc}", file=sys.stderr)
        return EXIT_USAGE
    timeline = None
    if args.timeline:
        match = re.fullmatch(r"([a-z][a-z0-9_-]*)\[(\d+)\]", args.timeline)
        if not match:
            print(
                f"procd logs: --timeline takes STAGE[INDEX], such as transform[2], got {args.timeline!r}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        timeline = (match.group(1), int(match.group(2)))
    try:
        source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as exc:
        print(f"procd logs: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    reader = events.RecordReader()
    with source:
        if args.summary or timeline:
            records = list(reader.records(source))
            sys.stdout.write(_summary(records) if args.summary else _timeline(records, *timeline))  # type: ignore[misc]
        else:
            color = sys.stdout.isatty() and not args.json
            try:
                for record in reader.records(_lines(source, args.follow)):
                    if keep.keeps(record):
                        print(json.dumps(record) if args.json else log.render(record, color=color), flush=args.follow)
            except KeyboardInterrupt:
                pass
    if reader.skipped:
        print(f"procd logs: {reader.skipped} lines were not procd records (skipped)", file=sys.stderr)
    return EXIT_OK


def _lines(source: Any, follow: bool) -> Iterator[str]:
    """Every complete line; with ``follow``, wait for more (a half-written line is held back)."""
    partial = ""
    while True:
        line = source.readline()
        if line.endswith("\n"):
            yield partial + line
            partial = ""
        elif line:
            partial += line
        elif not follow:
            if partial:
                yield partial
            return
        else:
            import time

            time.sleep(0.2)


def _summary(records: list[dict[str, Any]]) -> str:
    from procd import events

    rows = [("STAGE", "SPAWNS", "RESTARTS", "EXITS", "REDELIVERED", "DEAD_LETTERS", "IN", "OUT", "FIRST", "LAST")]
    summaries = events.summarize(records)
    unexited = sum(max(0, s.spawns - sum(s.exits.values())) for s in summaries.values())
    for name, s in summaries.items():
        exits = ", ".join(f"{cause}: {n}" for cause, n in sorted(s.exits.items())) or "-"
        rows.append(
            (
                name,
                str(s.spawns),
                str(s.restarts),
                exits,
                str(s.redelivered),
                str(s.dead_letters),
                str(s.items_in),
                str(s.items_out),
                s.first,
                s.last,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows)
    if unexited:  # counts reach the log when a worker exits
        table += (
            f"IN and OUT count only workers that have exited: {unexited} have no exit record yet "
            "(still running, or the log ends early); procd status shows their latest counts.\n"
        )
    return table


def _timeline(records: list[dict[str, Any]], stage: str, worker: int) -> str:
    from procd import events

    lines = [f"{stage}[{worker}]"]
    for g in events.timeline(records, stage, worker):
        ended = f"ended {g.ended} with {g.how} after {g.runtime_s}s" if g.ended else "still running"
        verdict = "" if g.expected is None else (" (expected)" if g.expected else f" (failure: {g.cause})")
        lines.append(f"  generation {g.generation}  pid {g.pid}  spawned {g.spawned}  {ended}{verdict}")
        lines += [f"    {note}" for note in g.notes]
    if len(lines) == 1:
        lines.append("  no records for this worker slot")
    return "\n".join(lines) + "\n"
