"""Keep one Python thread state per nbdkit connection thread, instead of one per request.

nbdkit's Python plugin wraps every callback in ``PyGILState_Ensure``/``PyGILState_Release``.
On a thread that holds no Python thread state of its own (every nbdkit connection thread),
Ensure makes a new one and the matching Release destroys it again, so each request pays
for a thread state: its 16 KiB frame stack is an mmap and a munmap, its thread id a gettid
(``strace -c`` of a 4 KiB copy: one mmap, one munmap and one gettid per request, with the
plaintext floor plugin too). That costs more than vmshield's whole request: keeping the
state for the connection's life doubled a plaintext plugin's 4 KiB nbdcopy throughput here
(docs/performance.md, "Thread states").

``keep()`` (in ``open``) adds one Ensure of our own, so nbdkit's Release after each callback
only lets go of the GIL and the thread state stays; ``drop()`` (in ``close``) gives it back,
and nbdkit's Release after ``close`` destroys the state as before. Both are only done on the
thread that runs them: with SERIALIZE_REQUESTS and SERIALIZE_ALL_REQUESTS (what the plugin
declares) nbdkit calls ``open``, every request and ``close`` of a connection on that
connection's thread. A thread that never reaches ``drop`` (a worker of a PARALLEL server)
keeps its state until nbdkit unloads Python: a few KiB, never a crash. Releasing on another
thread than the one kept would destroy that thread's state under nbdkit's feet, so a thread
only ever releases what it kept itself.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

_ensure: Any = None
_release: Any = None
try:  # libpython's own symbols: nbdkit loads its Python plugin (and libpython) globally
    _ensure = ctypes.pythonapi.PyGILState_Ensure
    _release = ctypes.pythonapi.PyGILState_Release
except AttributeError:  # a host that loaded libpython privately: keep nothing, as before
    _ensure = _release = None
else:
    _ensure.argtypes = []
    _ensure.restype = ctypes.c_int
    _release.argtypes = [ctypes.c_int]
    _release.restype = None


class ThreadStates:
    """The connection threads whose thread state is kept (``keep``/``drop`` on the thread)."""

    def __init__(self) -> None:
        # per thread state, not per thread id: a thread that ended without ``drop`` leaves
        # its id to a new thread, which must keep (and later release) a state of its own
        self._local = threading.local()
        self._lock = threading.Lock()
        self._count = 0

    def keep(self) -> None:
        """Keep the calling thread's Python thread state until ``drop`` on this thread."""
        if _ensure is None:
            return
        if getattr(self._local, "state", None) is None:  # a second open keeps nothing more
            self._local.state = _ensure()
            with self._lock:
                self._count += 1

    def drop(self) -> None:
        """Give back what ``keep`` took on the calling thread (nothing if it took nothing)."""
        state = getattr(self._local, "state", None)
        if state is not None:
            self._local.state = None
            with self._lock:
                self._count -= 1
            _release(state)

    def __len__(self) -> int:
        """How many threads keep their state now."""
        return self._count
