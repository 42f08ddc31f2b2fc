"""Exclusive locks on byte ranges of one disk, for servers that run requests in parallel.

A write that covers only part of a sector (or a filesystem block, see ``disk._span``) has to
read the whole unit, merge and write it back. Two such writes, or such a write and a plain
write of the same unit, must not interleave: the later write-back would put back bytes the
other request had just replaced. Such read-modify-writes (and hole punches) hold the range
they read back or change (``acquire``); requests on disjoint ranges run at the same time.

Writes of whole units cannot tear each other, so they take no lock (``enter``/``leave``):
they only say they are in flight, and look whether some exclusive range is held or wanted.
If one is, they take the exclusive path too; a read-modify-write, once it has its range,
waits for the whole-unit writes of that range that were already in flight. Every step is
one bytecode-level operation under the GIL (``list.append``/``remove``, an int read), in
this order: a writer appends then reads the count; an exclusive holder raises the count then
scans the list. So one of the two always sees the other.
"""

from __future__ import annotations

import threading
import time

DRAIN_SLEEP = 20e-6
"""Seconds between looks at in-flight whole-unit writes (a rare wait: a read-modify-write
that meets such a write of its own range in flight)."""


class RangeLock:
    """``acquire(start, end)`` waits until no held range overlaps ``[start, end)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._held: list[tuple[int, int]] = []
        self._waiters = 0
        self._exclusive = 0
        """Exclusive ranges held or being waited for: whole-unit writes check it."""
        self._plain: list[tuple[int, int]] = []
        """Whole-unit writes in flight without the lock."""

    def _overlaps(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self._held)

    def acquire(self, start: int, end: int) -> tuple[int, int]:
        """Hold ``[start, end)`` exclusively; give the returned token to ``release``."""
        token = (start, end)
        with self._lock:
            self._exclusive += 1
            while self._held and self._overlaps(start, end):
                self._waiters += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiters -= 1
            self._held.append(token)
        while any(s < end and start < e for s, e in list(self._plain)):
            time.sleep(DRAIN_SLEEP)
        return token

    def release(self, token: tuple[int, int]) -> None:
        with self._lock:
            self._held.remove(token)
            self._exclusive -= 1
            if self._waiters:
                self._cond.notify_all()

    def enter(self, start: int, end: int) -> bool:
        """Start a write of whole units ``[start, end)``; True if it had to take the range
        exclusively. Give both to ``leave``."""
        token = (start, end)
        self._plain.append(token)
        if not self._exclusive:
            return False
        self._plain.remove(token)
        self.acquire(start, end)
        return True

    def leave(self, start: int, end: int, exclusive: bool) -> None:
        if exclusive:
            self.release((start, end))
        else:
            self._plain.remove((start, end))

    def held(self) -> int:
        """How many ranges are held now, exclusively or not (for tests)."""
        with self._lock:
            return len(self._held) + len(self._plain)
