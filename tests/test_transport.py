"""The transport conformance suite: one set of tests, run against every backend, with real
processes and real SIGKILLs. A new backend joins by adding its name to ``BACKENDS``."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer

from conftest import wait_until
from procd import transport
from procd.config import QueueSpec
from procd.transport import Input, slot

BACKENDS = ["memory", "sqlite", "redis"]


@dataclass
class Point:
    """An item of a class the stage code defines (the supervisor never sees it)."""

    x: int
    y: str


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture(params=BACKENDS)
def make_input(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    made: list[Input] = []
    # the test's own streams on the module's server (pickle: items of user classes travel too)
    redis = {"url": request.getfixturevalue("redis_url"), "codec": "pickle", "upstream": ("up",), "claim_after_s": 5.0}

    def make(maxsize: int = 64, batch: int = 1, name: str = "q") -> Input:
        path = str(tmp_path / f"{name}.sqlite") if request.param == "sqlite" else None
        extra: dict[str, Any] = {}
        if request.param == "redis":
            extra = {**redis, "stream": f"procd:{request.node.name}:{name}"}
        created = transport.create(name, QueueSpec(maxsize, batch, request.param, path, **extra))
        created.write_from(["up"])  # the test is the supervisor of the upstream stage "up"
        made.append(created)
        return created

    yield make
    for created in made:
        created.close()


def _own(endpoint: Any, side: str) -> Any:
    """The endpoint on descriptors of its own, for a ``reader`` or ``writer`` in this process: its
    ``close`` must not close the input's, and a reader must not hold the writing end."""
    keep = endpoint.reader_fds() if side == "reader" else endpoint.writer_fds()
    fds = {}
    for f in dataclasses.fields(endpoint):
        if f.name.endswith("_fd"):
            fd = getattr(endpoint, f.name)
            fds[f.name] = os.dup(fd) if fd in keep else -1
    return dataclasses.replace(endpoint, **fds)


def _fork(body: Any) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def _reader_process(
    endpoint: Any, report_w: int, slot_fd: int | None = None, delay: float = 0.0, others: tuple[Any, ...] = ()
) -> int:
    """A reader: each batch it gets, as JSON, on ``report_w`` (a batch it was handed from a dead
    predecessor too); ends at the end of stream. It lets go of every writing end it inherited
    (``others``: of other inputs), as a worker does."""

    def body() -> None:
        for fd in {fd for e in (endpoint, *others) for fd in e.writer_fds() - e.reader_fds()}:
            try:
                os.close(fd)
            except OSError:  # the input has ended: this process never had it
                pass
        held_slot = slot.SlotFile(slot_fd) if slot_fd is not None else None
        reader = endpoint.reader(held_slot)
        held = reader.held()
        if held is not None:
            os.write(report_w, json.dumps({"pid": os.getpid(), "items": held.items}).encode() + b"\n")
            reader.done()
        for batch in reader:
            time.sleep(delay)
            os.write(report_w, json.dumps({"pid": os.getpid(), "items": batch}).encode() + b"\n")
            reader.done()

    return _fork(body)


def _writer_process(endpoint: Any, items: list[Any], batch: int) -> int:
    def body() -> None:
        for fd in endpoint.reader_fds() - endpoint.writer_fds():
            os.close(fd)
        writer = endpoint.writer()
        for start in range(0, len(items), batch):
            writer.send(items[start : start + batch])
        writer.close()

    return _fork(body)


def _reports(fd: int) -> list[dict[str, Any]]:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def _reap(pids: list[int]) -> None:
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0


def test_every_item_is_delivered_once_to_several_readers_from_several_writers(make_input: Any) -> None:
    queue = make_input(maxsize=64, batch=10)
    endpoint = queue.endpoint()
    report_r, report_w = os.pipe()
    readers = [_reader_process(endpoint, report_w) for _ in range(3)]
    writers = [_writer_process(endpoint, list(range(w, 6000, 2)), 10) for w in range(2)]
    os.close(report_w)
    _reap(writers)
    queue.end()  # fan-in: the end of stream comes once both writers are done and the queue is
    got = [n for r in _reports(report_r) for n in r["items"]]
    os.close(report_r)
    _reap(readers)
    assert sorted(got) == list(range(6000))


def test_fan_out_two_inputs_each_get_every_item(make_input: Any) -> None:
    inputs = [make_input(maxsize=32, batch=8, name=f"out{n}") for n in range(2)]
    report_r, report_w = os.pipe()
    endpoints = tuple(q.endpoint() for q in inputs)
    readers = [_reader_process(e, report_w, others=endpoints) for e in endpoints]
    os.close(report_w)
    writers = [_own(e, "writer").writer() for e in endpoints]
    for start in range(0, 800, 8):
        for writer in writers:
            writer.send(list(range(start, start + 8)))
    for writer, q in zip(writers, inputs, strict=True):
        writer.close()
        q.end()
    reports = _reports(report_r)
    os.close(report_r)
    _reap(readers)
    for pid in readers:
        assert sorted(n for r in reports if r["pid"] == pid for n in r["items"]) == list(range(800))


def test_a_full_input_blocks_its_writer_and_memory_stays_flat(make_input: Any) -> None:
    queue = make_input(maxsize=3, batch=1)
    endpoint = queue.endpoint()
    writer = _own(endpoint, "writer").writer()
    reader = _own(endpoint, "reader").reader()
    for n in range(3):
        writer.send([n])
    assert queue.depth() == 3
    fourth = threading.Thread(target=writer.send, args=([3],), daemon=True)
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive(), "the writer was not held back by a full input"
    assert reader.receive() == [0]
    reader.done()
    wait_until(lambda: not fourth.is_alive(), timeout=5)
    # a writer that sends 2,000 batches of 100 KB through a 3-batch bound never holds more
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    thread = threading.Thread(target=lambda: [writer.send(["x" * 100_000]) for _ in range(2000)], daemon=True)
    thread.start()
    for _ in range(3 + 2000):
        assert reader.receive() is not None
        reader.done()
    thread.join(10)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 50_000, f"memory grew by {grown_kb} KB for 200 MB sent"
    writer.close()
    queue.end()
    assert reader.receive() is None
    reader.close()


def test_a_10_mb_batch_arrives_whole(make_input: Any) -> None:
    queue = make_input(maxsize=4, batch=1)
    endpoint = queue.endpoint()
    big = ["x" * 100_000 for _ in range(100)]
    writer, reader = _own(endpoint, "writer").writer(), _own(endpoint, "reader").reader()
    writer.send(big)
    assert reader.receive() == big
    reader.done()
    writer.close()
    queue.end()
    assert reader.receive() is None
    reader.close()


def test_items_of_a_user_class_travel_and_the_slot_header_counts_them_without_unpickling(make_input: Any) -> None:
    queue = make_input(maxsize=8, batch=4)
    endpoint = queue.endpoint()
    fd = slot.create(slot.MESSAGE_CAPACITY)
    try:
        writer, reader = _own(endpoint, "writer").writer(), _own(endpoint, "reader").reader(slot.SlotFile(fd))
        points = [Point(n, str(n)) for n in range(3)]
        writer.send(points)
        assert reader.receive() == points
        header = slot.read(fd)  # what the supervisor sees: numbers only
        assert header.holds and header.items == 3 and header.in_token == 0
        reader.done()
        assert not slot.read(fd).holds
        writer.close()
        reader.close()
    finally:
        os.close(fd)


def test_a_batch_with_an_item_the_codec_cannot_take_is_refused_whole_naming_the_item(make_input: Any) -> None:
    queue = make_input(maxsize=8, batch=4)
    endpoint = queue.endpoint()
    writer, reader = _own(endpoint, "writer").writer(), _own(endpoint, "reader").reader()
    with pytest.raises(transport.EncodeError) as raised:
        writer.send([1, 2, lambda: 3, 4])
    assert raised.value.index == 2 and "item 2 of the batch cannot be encoded" in str(raised.value)
    assert queue.depth() == 0  # nothing of it was sent
    writer.send([1, 2, 4])
    assert reader.receive() == [1, 2, 4]
    reader.done()
    writer.close()
    queue.end()
    assert reader.receive() is None
    reader.close()


def test_replay_into_it_through_an_attached_writer(make_input: Any) -> None:
    queue = make_input(maxsize=8, batch=2)
    fields, fds = queue.attach()
    json.dumps(fields)  # it travels in a JSON reply
    writer = transport.attached_writer(json.loads(json.dumps(fields)), [os.dup(fd) for fd in fds])
    writer.send([Point(1, "a"), Point(2, "b")])
    writer.close()
    queue.end()
    reader = _own(queue.endpoint(), "reader").reader()
    assert reader.receive() == [Point(1, "a"), Point(2, "b")]
    reader.done()
    assert reader.receive() is None
    reader.close()


def test_sigkilled_readers_lose_nothing_and_leak_no_capacity(make_input: Any) -> None:
    """At-least-once: readers killed at random are replaced, each by a process with the same slot
    file (as the supervisor does), which delivers the batch its predecessor held; the capacity a
    killed reader held is given back from its slot header."""
    count, batch = 3000, 5
    queue = make_input(maxsize=10, batch=batch)
    endpoint = queue.endpoint()
    report_r, report_w = os.pipe()
    slots = [slot.create(slot.MESSAGE_CAPACITY) for _ in range(3)]
    readers = {i: _reader_process(endpoint, report_w, slots[i], delay=0.002) for i in range(3)}
    writer_pid = _writer_process(endpoint, list(range(count)), batch)
    rng = random.Random(3)
    kills = 0
    got: list[int] = []
    os.set_blocking(report_r, False)
    buffer = b""

    def drain() -> None:
        nonlocal buffer
        try:
            while chunk := os.read(report_r, 65536):
                buffer += chunk
        except BlockingIOError:
            pass

    deadline = time.monotonic() + 20
    try:
        while kills < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
            drain()
            index = rng.randrange(3)
            os.kill(readers[index], signal.SIGKILL)
            os.waitpid(readers[index], 0)
            kills += 1
            header = slot.read(slots[index])
            if header.in_token:
                queue.reclaim()
            slot.clear_tokens(slots[index])
            readers[index] = _reader_process(endpoint, report_w, slots[index], delay=0.002)
        _reap([writer_pid])
        queue.end()
        os.close(report_w)
        os.set_blocking(report_r, True)
        drain()
        buffer += b"".join(iter(lambda: os.read(report_r, 65536), b""))
        _reap(list(readers.values()))
    finally:
        for pid in [writer_pid, *readers.values()]:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(report_r)
        for fd in slots:
            os.close(fd)
    got = [n for line in buffer.splitlines() for n in json.loads(line)["items"]]
    assert kills >= 10
    assert set(got) == set(range(count)), f"lost {sorted(set(range(count)) - set(got))[:10]}"
    assert len(got) - count <= kills * batch  # duplicates only from batches in flight
    assert queue.depth() == 0  # every unit of capacity came back


def test_a_reader_killed_while_it_waits_to_receive_wedges_nobody(make_input: Any) -> None:
    queue = make_input(maxsize=2, batch=1)
    endpoint = queue.endpoint()
    report_r, report_w = os.pipe()
    fd = slot.create(slot.MESSAGE_CAPACITY)
    victim = _reader_process(endpoint, report_w, fd)
    wait_until(lambda: slot.read(fd).waiting == slot.WAITING_INPUT, timeout=5)  # it says it waits
    os.kill(victim, signal.SIGKILL)
    os.waitpid(victim, 0)
    assert not slot.read(fd).holds
    survivor = _reader_process(endpoint, report_w)
    os.close(report_w)
    writer = _own(endpoint, "writer").writer()
    for n in range(50):
        writer.send([n])
    writer.close()
    queue.end()
    got = [n for r in _reports(report_r) for n in r["items"]]
    os.close(report_r)
    os.close(fd)
    _reap([survivor])
    assert got == list(range(50))
