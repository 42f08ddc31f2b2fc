"""Positioned reads and writes that finish the job: pread/pwrite loop until done.

A single pread or pwrite may transfer fewer bytes than asked (signals, block-device limits,
the end of a file). Every caller in vmshield wants all of them, or to know where the file
ended.
"""

from __future__ import annotations

import os

Buffer = bytes | bytearray | memoryview


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; fewer only when the file ends first."""
    chunks = []
    while length > 0:
        data = os.pread(fd, length, offset)
        if not data:
            break
        chunks.append(data)
        offset += len(data)
        length -= len(data)
    return b"".join(chunks)


def preadinto_all(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; returns the bytes read (short only at end of file)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
