"""Small syscalls Python's os module lacks: hole punching and hole/data lookup."""

from __future__ import annotations

import ctypes
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range of a regular file (it then reads as zeros)."""
    if length <= 0:
        return
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"punching a hole failed: {os.strerror(err)}")


def data_segments(fd: int, start: int, end: int) -> list[tuple[int, int, bool]]:
    """Split [start, end) into (offset, length, is_data) runs using SEEK_DATA/SEEK_HOLE.

    Filesystems without hole support report everything as data.
    """
    runs: list[tuple[int, int, bool]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole until end of file
                data = end
            else:
                return [(start, end - start, True)]
        data = min(data, end)
        if data > pos:
            runs.append((pos, data - pos, False))
            pos = data
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        runs.append((pos, hole - pos, True))
        pos = hole
    return runs


def first_hole(fd: int, start: int) -> int:
    """Offset of the first hole at or after ``start`` (file size if none)."""
    return os.lseek(fd, start, os.SEEK_HOLE)
