"""The local queue transport with real processes: whole messages, a killed reader wedges nobody,
a full queue blocks its writer, and the end of stream is the last writer's close."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from conftest import wait_until
from procd import queues


def _fork_reader(fds: queues.QueueFds, report_w: int, delay: float = 0.0) -> int:
    """A reader process: receives until EOF, checks every batch is whole, reports its totals."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(fds.write_fd)
            reader = queues.QueueReader(fds)
            items = 0
            for batch in reader:
                assert batch == list(range(batch[0], batch[0] + 100)), "a batch arrived cut or mixed"
                items += len(batch)
                os.write(report_w, json.dumps({"pid": os.getpid(), "tick": 1}).encode() + b"\n")
                time.sleep(delay)
            os.write(report_w, json.dumps({"pid": os.getpid(), "items": items}).encode() + b"\n")
            code = 0
        finally:
            os._exit(code)
    return pid


def _read_reports(fd: int) -> list[dict]:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_several_readers_share_whole_batches_and_see_the_end() -> None:
    fds = queues.create_queue(slots=8)
    report_r, report_w = os.pipe()
    readers = [_fork_reader(fds, report_w) for _ in range(3)]
    os.close(report_w)
    os.close(fds.read_fd)
    writer = queues.QueueWriter(fds)
    for start in range(0, 100_000, 100):
        writer.send(list(range(start, start + 100)))
    writer.close()  # the last writing end: every reader sees the end of the stream
    totals = [r["items"] for r in _read_reports(report_r) if "items" in r]
    os.close(report_r)
    for pid in readers:
        assert os.waitpid(pid, 0)[1] == 0
    assert sorted(totals) == sorted(totals) and sum(totals) == 100_000 and len(totals) == 3


def test_a_reader_killed_mid_stream_does_not_wedge_the_others() -> None:
    fds = queues.create_queue(slots=4)
    report_r, report_w = os.pipe()
    victim = _fork_reader(fds, report_w, delay=0.01)
    survivor = _fork_reader(fds, report_w)
    os.close(report_w)
    os.close(fds.read_fd)
    writer = queues.QueueWriter(fds)
    sent = 0
    for start in range(0, 50_000, 100):
        writer.send(list(range(start, start + 100)))
        sent += 100
        if start == 5_000:
            os.kill(victim, signal.SIGKILL)
            os.waitpid(victim, 0)
    writer.close()
    reports = _read_reports(report_r)
    os.close(report_r)
    assert os.waitpid(survivor, 0)[1] == 0
    (survivor_total,) = [r["items"] for r in reports if r.get("pid") == survivor and "items" in r]
    victim_ticks = sum(1 for r in reports if r.get("pid") == victim)
    # everything the victim did not take, the survivor got; the victim held at most one batch
    assert survivor_total + victim_ticks * 100 in (sent, sent - 100)


def test_a_full_queue_blocks_its_writer_until_a_reader_takes_a_batch() -> None:
    fds = queues.create_queue(slots=3)
    writer = queues.QueueWriter(fds)
    reader = queues.QueueReader(fds)
    for n in range(3):
        writer.send([n])
    fourth = threading.Thread(target=writer.send, args=([3],), daemon=True)
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive(), "the writer was not held back by a full queue"
    assert reader.receive() == [0]
    wait_until(lambda: not fourth.is_alive(), timeout=5)
    assert [reader.receive() for _ in range(3)] == [[1], [2], [3]]
    writer.close()
    assert reader.receive() is None
    reader.close()
    queues.close_fds((fds.slots_fd,))


def test_a_batch_too_large_for_one_message_is_split() -> None:
    fds = queues.create_queue(slots=64)
    writer = queues.QueueWriter(fds)
    reader = queues.QueueReader(fds)
    big = ["x" * 100_000 for _ in range(120)]  # about 12 MB: more than one message holds
    received: list[str] = []
    thread = threading.Thread(target=lambda: received.extend(item for b in reader for item in b), daemon=True)
    thread.start()
    writer.send(big)
    writer.close()
    thread.join(10)
    assert received == big
    reader.close()
    queues.close_fds((fds.slots_fd,))
