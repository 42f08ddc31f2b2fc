"""Exclusive locks on byte ranges of one disk, for servers that run requests in parallel.

A write that covers only part of a sector (or a filesystem block, see ``disk._span``) has to
read the whole unit, merge and write it back. Two such writes, or such a write and a plain
write of the same unit, must not interleave: the later write-back would put back bytes the
other request had just replaced. Every request that changes the image therefore holds the
range it reads back or changes; requests on disjoint ranges run at the same time.
"""

from __future__ import annotations

import threading


class RangeLock:
    """``acquire(start, end)`` waits until no held range overlaps ``[start, end)``.

    Uncontended, a request costs one C-level lock round trip each way: the condition is only
    waited on, and notified, when some request had to wait.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._held: list[tuple[int, int]] = []
        self._waiters = 0

    def _overlaps(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self._held)

    def acquire(self, start: int, end: int) -> tuple[int, int]:
        """Hold ``[start, end)``; give the returned token to ``release``."""
        token = (start, end)
        with self._lock:
            while self._held and self._overlaps(start, end):
                self._waiters += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiters -= 1
            self._held.append(token)
        return token

    def release(self, token: tuple[int, int]) -> None:
        with self._lock:
            self._held.remove(token)
            if self._waiters:
                self._cond.notify_all()

    def held(self) -> int:
        """How many ranges are held now (for tests)."""
        with self._lock:
            return len(self._held)
