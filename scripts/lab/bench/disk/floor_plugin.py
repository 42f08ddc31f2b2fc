"""The Python floor: a plaintext nbdkit Python plugin that only preads and pwrites.

    nbdkit python scripts/lab/bench/disk/floor_plugin.py file=IMAGE [thread_model=MODEL]

MODEL is parallel (default), serialize_requests or serialize_all_requests. Which one is
fastest depends on the request size and the machine (at small requests, nbdkit's threads
mostly hand the GIL to each other), so `scripts/bench` runs all three and takes the fastest
as the floor, column by column: the difference to it is what vmshield costs beyond the
cheapest Python plugin, whatever thread model either uses.

Like vmshield's plugin it keeps each connection thread's Python thread state from open to
close (``nbd_plugin.serve.threadstate``): without that nbdkit makes and destroys one per
request, which costs more than a 4 KiB request's pread (docs/performance.md "Thread
states"), and a floor without it would not be the cheapest Python plugin.
"""

import os
import sys

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import nbdkit  # noqa: E402

from nbd_plugin.serve.threadstate import ThreadStates  # noqa: E402

API_VERSION = 2

MODELS = {
    "parallel": "THREAD_MODEL_PARALLEL",
    "serialize_requests": "THREAD_MODEL_SERIALIZE_REQUESTS",
    "serialize_all_requests": "THREAD_MODEL_SERIALIZE_ALL_REQUESTS",
}

_path = ""
_fd = -1
_model = "parallel"


def config(key: str, value: str) -> None:
    global _path, _model
    if key == "file":
        _path = value
    elif key == "thread_model" and value in MODELS:
        _model = value
    elif key == "thread_model":
        raise RuntimeError(f"thread_model must be one of {', '.join(MODELS)}")
    else:
        raise RuntimeError(f"unknown parameter {key}= (known: file, thread_model)")


def config_complete() -> None:
    global _fd
    _fd = os.open(_path, os.O_RDWR | os.O_CLOEXEC)


def thread_model() -> int:
    return int(getattr(nbdkit, MODELS[_model]))


_threads = ThreadStates()


def open(readonly: bool) -> int:
    _threads.keep()  # PARALLEL gains nothing: its workers, not this thread, run the requests
    return _fd


def close(h: int) -> None:
    _threads.drop()


def get_size(h: int) -> int:
    return os.fstat(h).st_size


def can_multi_conn(h: int) -> bool:
    return True


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(h, [view[done:]], offset + done)
        if n == 0:
            raise OSError("short read")
        done += n


def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        done += os.pwritev(h, [view[done:]], offset + done)


def flush(h: int, flags: int) -> None:
    os.fdatasync(h)
