"""The Python floor: a plaintext nbdkit Python plugin that only preads and pwrites.

    nbdkit python nbd_plugin/bench/floor_plugin.py file=IMAGE

Same thread model as vmshield's plugin (PARALLEL, as on its numba data path), so the difference
to it is the cryptography alone.
"""

import os

import nbdkit

API_VERSION = 2

_path = ""
_fd = -1


def config(key: str, value: str) -> None:
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key}= (known: file)")
    _path = value


def config_complete() -> None:
    global _fd
    _fd = os.open(_path, os.O_RDWR | os.O_CLOEXEC)


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def open(readonly: bool) -> int:
    return _fd


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
