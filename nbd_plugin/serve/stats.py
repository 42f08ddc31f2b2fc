"""A server's I/O counters, published for `vmshield status` (at most once per second).

The plugin counts the plaintext bytes its clients read and write (`IoStats.add_read` /
`add_written`, from any request thread) and, with `stats=PATH`, a `Publisher` thread writes
them to PATH through nbd_plugin.osutil.statefile, when they changed and at most once per
`interval`, and once more when the server shuts down. Nothing here can fail a request: a
full or missing run directory only leaves the file stale.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from nbd_plugin.osutil import statefile

#: seconds between two writes of the stats file, at least
INTERVAL = 1.0


class IoStats:
    """Bytes read and written by clients, counted under a lock (requests run in parallel)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read_bytes = 0
        self.written_bytes = 0
        self.reads = 0
        self.writes = 0

    def add_read(self, n: int) -> None:
        with self._lock:
            self.read_bytes += n
            self.reads += 1

    def add_written(self, n: int) -> None:
        with self._lock:
            self.written_bytes += n
            self.writes += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"read_bytes": self.read_bytes, "written_bytes": self.written_bytes,
                    "reads": self.reads, "writes": self.writes}  # fmt: skip


class Publisher:
    """Writes `stats` to `path` when they changed, at most once per `interval`."""

    def __init__(self, stats: IoStats, path: str, *, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.stats = stats
        self.path = path
        self.interval = interval
        self._clock = clock
        self._last: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> None:
        """Write the counters now if they changed since the last write."""
        now = self.stats.snapshot()
        if now == self._last:
            return
        state: dict[str, Any] = {**now, "pid": os.getpid(), "updated": self._clock()}
        with contextlib.suppress(OSError):
            statefile.publish(self.path, state)
            self._last = now

    def start(self) -> None:
        self.publish()  # zeros at once: status shows a served disk's counters from the start
        self._thread = threading.Thread(target=self._run, name="vmshield-stats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.publish()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval * 2)
        self.publish()
