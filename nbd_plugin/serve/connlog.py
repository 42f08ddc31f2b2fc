"""The plugin's log of NBD connections: one timestamped line per connect and disconnect.

nbdkit's own messages carry no time; what this log says is when a connection opened and
closed, whether it may write, how many are open, and (with `bind=`) which client was refused
and why (nbd_plugin/serve/peers.py). `vmshield status` names the clients themselves (from the
kernel's socket table).

nbdkit points stderr at /dev/null when it forks into the background (unless -v): `keep`
duplicates the startup stderr before that if it is a file (`vmshield disk serve`'s log),
and the lines go there.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable


def stamp(now: float) -> str:
    """ISO 8601 UTC with milliseconds: 2026-12-07T01:45:00.123Z."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    return f"{whole}.{int(now % 1 * 1000):03d}Z"


class ConnectionLog:
    """Counts open connections (callbacks may run on several threads) and words each event."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._open = 0
        self._seen = 0
        self._fd = 2

    def keep(self) -> None:
        """Keep writing to the current stderr after nbdkit replaces it (call before the fork)."""
        with contextlib.suppress(OSError):
            # only a log file: a pipe kept open would never reach EOF for whoever reads
            # it (`nbdkit ... 2>&1 | cat`); in the foreground (-f) stderr stays anyway
            if stat.S_ISREG(os.fstat(2).st_mode):
                self._fd = os.dup(2)  # not inherited by children (PEP 446)

    def write(self, line: str) -> None:
        """Write one line; a full disk or closed log never fails a connection."""
        with contextlib.suppress(OSError):
            os.write(self._fd, line.encode() + b"\n")

    def connected(self, readonly: bool) -> str:
        with self._lock:
            self._open += 1
            self._seen += 1
            n, now_open = self._seen, self._open
        mode = "read-only" if readonly else "read-write"
        return f"{stamp(self._clock())} vmshield: client #{n} connected ({mode}); {now_open} open"

    def refused(self, reason: str) -> str:
        """A connection the server would not open (``bind=``: not the bound VM's QEMU)."""
        return f"{stamp(self._clock())} vmshield: refused a client: {reason}"

    def disconnected(self) -> str:
        with self._lock:
            self._open = max(0, self._open - 1)
            now_open = self._open
        return f"{stamp(self._clock())} vmshield: a client disconnected; {now_open} open"
