"""The range lock: exclusive ranges for read-modify-writes, no lock for whole-unit writes.

test_parallel_writes.py races real writes; here the ordering rules one by one.
"""

from __future__ import annotations

import threading
import time

from nbd_plugin.serve.rangelock import RangeLock


def _acquire_in_thread(
    lock: RangeLock, start: int, end: int
) -> tuple[threading.Thread, list[float]]:
    got: list[float] = []

    def run() -> None:
        lock.release(lock.acquire(start, end))
        got.append(time.monotonic())

    t = threading.Thread(target=run)
    t.start()
    return t, got


def test_whole_unit_writes_take_no_lock_and_do_not_wait_for_each_other() -> None:
    lock = RangeLock()
    assert lock.enter(0, 8192) is False
    assert lock.enter(4096, 8192) is False  # overlapping whole-unit writes: no exclusion
    assert lock.held() == 2
    lock.leave(4096, 8192, False)
    lock.leave(0, 8192, False)
    assert lock.held() == 0


def test_a_read_modify_write_waits_for_a_whole_unit_write_in_flight() -> None:
    lock = RangeLock()
    exclusive = lock.enter(4096, 8192)
    thread, got = _acquire_in_thread(lock, 0, 12288)
    time.sleep(0.05)
    assert got == []  # still waiting for the write in flight
    left = time.monotonic()
    lock.leave(4096, 8192, exclusive)
    thread.join(5)
    assert got and got[0] >= left


def test_a_read_modify_write_does_not_wait_for_writes_elsewhere() -> None:
    lock = RangeLock()
    exclusive = lock.enter(1 << 20, (1 << 20) + 4096)
    thread, got = _acquire_in_thread(lock, 0, 12288)
    thread.join(5)
    assert got
    lock.leave(1 << 20, (1 << 20) + 4096, exclusive)


def test_a_whole_unit_write_waits_while_a_range_is_held() -> None:
    lock = RangeLock()
    held = lock.acquire(0, 8192)
    entered: list[bool] = []

    def write() -> None:
        exclusive = lock.enter(4096, 8192)
        entered.append(exclusive)
        lock.leave(4096, 8192, exclusive)

    t = threading.Thread(target=write)
    t.start()
    time.sleep(0.05)
    assert entered == []
    lock.release(held)
    t.join(5)
    assert entered == [True]  # it took the exclusive path
    assert lock.held() == 0
