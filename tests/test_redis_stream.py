"""The Redis Streams operations behind the ``redis`` backend, against a real redis-server."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer

from conftest import wait_until
from procd import config
from procd.config import QueueSpec
from procd.transport import Interrupted, redisstream, slot, streams
from procd.transport.redisstream import Names, Stream


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def stream(server: RedisServer) -> Iterator[Stream]:
    client = redisstream.connect(server.url)
    stream = Stream(client, Names("procd:p:sink", "sink"))
    stream.create()
    yield stream
    client.close()


def test_an_entry_is_read_once_and_gone_from_the_stream_when_acknowledged(stream: Stream) -> None:
    stream.send([(b"one", 1), (b"two", 2)], bound=10)
    first = stream.read("c1")
    second = stream.read("c2")
    assert first is not None and second is not None
    assert (first.payload, first.count, first.deliveries) == (b"one", 1, 1)
    assert (second.payload, second.count) == (b"two", 2)
    assert stream.read("c1", block_ms=10) is None
    assert stream.backlog() == (0, 2)
    stream.acknowledge(first.id)
    stream.acknowledge(second.id)
    assert stream.backlog() == (0, 0)
    assert stream.client.xlen(stream.names.stream) == 0


def test_a_writer_blocks_at_the_bound_until_entries_are_read(stream: Stream) -> None:
    waits = []

    def stop() -> bool:
        waits.append(1)
        return len(waits) > 3

    with pytest.raises(InterruptedError):
        stream.send([(b"a", 1), (b"b", 1), (b"c", 1)], bound=2, stop=stop)
    assert stream.client.xlen(stream.names.stream) == 2
    taken = stream.read("c1")
    assert taken is not None
    stream.send([(b"c", 1)], bound=2)  # one was delivered: there is room again
    assert stream.backlog() == (2, 1)


def test_a_read_acknowledges_what_was_handed_on_in_the_same_round_trip(stream: Stream) -> None:
    stream.send([(b"one", 1), (b"two", 1)], bound=10)
    first = stream.read("c")
    assert first is not None
    second = stream.read("c", acknowledge=(first.id,))
    assert second is not None and second.payload == b"two"
    assert stream.backlog() == (0, 1)  # the first is no longer pending
    assert [raw_id.decode() for raw_id, _ in stream.client.xrange(stream.names.stream)] == [second.id]
    assert stream.read("c", block_ms=10, acknowledge=(second.id,)) is None
    assert stream.backlog() == (0, 0) and stream.client.xlen(stream.names.stream) == 0


def _input(server: RedisServer) -> streams.RedisInput:
    spec = QueueSpec(64, 1, "redis", url=server.url, stream="procd:p:q", codec="json", upstream=("up",))
    made = streams.create("q", spec)
    made.write_from(["up"])
    return made


def test_a_reader_killed_after_handing_a_batch_on_leaves_it_to_its_slot_s_next_process(server: RedisServer) -> None:
    """The acknowledgement waits for the next read; a process killed before it leaves the entry
    pending, and the slot says whose: its next process delivers it again at once."""
    queue = _input(server)
    endpoint = queue.endpoint()
    writer = endpoint.writer()
    writer.send([1, 2])
    fd = slot.create(slot.MESSAGE_CAPACITY)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            reader = endpoint.reader(slot.SlotFile(fd))
            assert reader.receive() == [1, 2]
            reader.done()  # handed on; killed before it reads again
            os.write(ready_w, b"x")
            signal.pause()
        finally:
            os._exit(1)
    try:
        assert os.read(ready_r, 1) == b"x"
        assert Stream(queue.client, endpoint.names).backlog() == (0, 1)  # not yet acknowledged
        assert not slot.read(fd).holds  # the supervisor counts no batch in hand
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    successor = endpoint.reader(slot.SlotFile(fd))
    held = successor.held()
    assert held is not None and held.items == [1, 2] and held.deliveries == 1
    successor.done()
    writer.close()
    queue.end()
    assert successor.receive() is None  # the acknowledgement went with this last read
    assert Stream(queue.client, endpoint.names).backlog() == (0, 0)
    successor.close()
    queue.close()
    for end in (fd, ready_r, ready_w):
        os.close(end)


def test_a_reader_told_to_stop_acknowledges_what_it_handed_on(server: RedisServer) -> None:
    queue = _input(server)
    endpoint = queue.endpoint()
    writer = endpoint.writer()
    writer.send(["a"])
    fd = slot.create(slot.MESSAGE_CAPACITY)
    reader = endpoint.reader(slot.SlotFile(fd))
    assert reader.receive() == ["a"]
    reader.done()
    stop_r, stop_w = os.pipe()
    os.write(stop_w, b"x")
    with pytest.raises(Interrupted):
        reader.receive(stop_r)
    assert Stream(queue.client, endpoint.names).backlog() == (0, 0)
    reader.close()
    writer.close()
    queue.close()
    for end in (fd, stop_r, stop_w):
        os.close(end)


def test_the_end_of_the_input_wakes_a_reader_blocked_in_a_read(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader blocked in a read when the last writer leaves is woken (``CLIENT UNBLOCK``),
    looks, and sees the end, rather than when its read times out."""
    monkeypatch.setattr(redisstream, "READ_BLOCK_MS", 4000)  # below the client's socket timeout
    queue = _input(server)
    endpoint = queue.endpoint()
    results: list[object] = []
    reader = endpoint.reader(None)
    thread = threading.Thread(target=lambda: results.append(reader.receive()))
    thread.start()
    stream = Stream(queue.client, endpoint.names)

    def blocked() -> bool:
        return any("b" in c["flags"] and c["cmd"] == "xreadgroup" for c in stream.client.client_list())

    try:
        wait_until(blocked, timeout=5)
        assert stream.wake_readers() == 1  # the writer is still there: it looks, and reads again
        wait_until(blocked, timeout=5)
        queue.end()  # the last writer leaves, and wakes it
    finally:
        thread.join(timeout=10)
    assert results == [None]
    reader.close()
    assert not stream.client.hgetall(stream.names.readers)  # it let go of its place
    queue.close()


def test_a_reader_busy_when_the_last_writer_left_sees_the_end_without_waiting(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end's wake-up reaches only readers blocked in a read; one that was handing a batch on
    looks without waiting first, and that look says no writer is left (were it to wait, its read
    would outlast the client's socket timeout and the test its own)."""
    monkeypatch.setattr(redisstream, "READ_BLOCK_MS", 600_000)
    queue = _input(server)
    endpoint = queue.endpoint()
    writer = endpoint.writer()
    writer.send(["last"])
    writer.close()
    reader = endpoint.reader(None)
    assert reader.receive() == ["last"]
    queue.end()  # meanwhile: the last writer leaves; nobody is blocked, so nobody is woken
    reader.done()
    assert reader.receive() is None
    reader.close()
    queue.close()


def test_an_idle_reader_costs_one_round_trip_per_read_while_writers_are_registered(server: RedisServer) -> None:
    """It reads the writers' count in its read's pipeline, and looks at the end (SMEMBERS,
    HGETALL, XINFO) only now and then while a writer is registered."""
    queue = _input(server)
    endpoint = queue.endpoint()
    reader = endpoint.reader(None)
    stop_r, stop_w = os.pipe()
    results: list[object] = []

    def receive() -> None:
        try:
            reader.receive(stop_r)
        except Interrupted:
            results.append("interrupted")

    thread = threading.Thread(target=receive)
    client = queue.client

    def calls(command: str) -> int:
        return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    client.config_resetstat()
    thread.start()
    try:
        wait_until(lambda: calls("xreadgroup") >= 5, timeout=10)
    finally:
        os.write(stop_w, b"x")
        thread.join(timeout=10)
    assert results == ["interrupted"]
    assert calls("smembers") <= 1  # one look at the start (claim_after is 30 s)
    reader.close()
    queue.close()
    os.close(stop_r)
    os.close(stop_w)


def test_the_next_process_of_a_slot_takes_over_the_entry_its_predecessor_held(stream: Stream) -> None:
    stream.send([(b"batch", 3)], bound=10)
    held = stream.read("host:100:sink:0")
    assert held is not None
    again = stream.claim("host:101:sink:0", held.id)
    assert again is not None and again.payload == b"batch" and again.deliveries == 2
    assert stream.claim_idle("elsewhere:7:sink:1", idle_ms=60_000) is None  # not idle long enough
    third = stream.claim_idle("elsewhere:7:sink:1", idle_ms=0)
    assert third is not None and third.id == held.id and third.deliveries == 3


def test_the_input_ends_once_every_writer_is_gone_and_nothing_is_left(stream: Stream) -> None:
    upstreams = ["transform"]
    assert not stream.check_ended(upstreams, ttl_s=5)  # no writer seen yet: it may still come
    stream.register("hostA:1", "transform", ttl_s=30)
    stream.send([(b"x", 1)], bound=10)
    stream.deregister("hostA:1", "transform")
    assert not stream.check_ended(upstreams, ttl_s=5)  # one entry waits
    entry = stream.read("c")
    assert entry is not None
    assert not stream.check_ended(upstreams, ttl_s=5)  # one entry is in a reader's hands
    stream.acknowledge(entry.id)
    assert stream.check_ended(upstreams, ttl_s=5)
    assert stream.ended()
    assert not stream.check_ended(upstreams, ttl_s=5, since=stream.server_time())  # for a later run
    stream.register("hostA:2", "transform", ttl_s=30)  # a new run's writer
    assert not stream.ended()


def test_a_writer_that_stopped_renewing_counts_as_gone(stream: Stream) -> None:
    stream.register("hostB:9", "transform", ttl_s=30)
    assert not stream.check_ended(["transform"], ttl_s=5)
    stream.register("hostB:9", "transform", ttl_s=-1)  # its last heartbeat's expiry has passed
    assert stream.check_ended(["transform"], ttl_s=5)
    assert not stream.client.hgetall(stream.names.writers)  # the dead writer was cleared away


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://localhost:6379/0", None),
        ("rediss://user:secret@cache.example:6380/2", None),
        ("unix:///run/redis/redis.sock?db=1", None),
        ("http://localhost", 'must start with redis://, rediss://, unix://, got "http"'),
        ("redis://localhost:port", "cannot be parsed"),
        ("unix://", "a unix:// URL needs the socket's path"),
        ("redis:///0", "needs a host"),
    ],
)
def test_urls_are_checked_at_load_time(url: str, problem: str | None) -> None:
    found = config.check_redis_url(url)
    assert (found is None) if problem is None else (found is not None and found.startswith(problem))


def test_the_password_never_leaves_the_url_unredacted() -> None:
    assert config.redact_url("redis://app:s3cret@db:6379/0") == "redis://app:***@db:6379/0"
    assert config.redact_url("redis://:s3cret@db/0") == "redis://:***@db/0"
    assert config.redact_url("redis://db:6379/0") == "redis://db:6379/0"
