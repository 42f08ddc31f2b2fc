"""Where a file has blocks: SEEK_DATA/SEEK_HOLE runs, FIEMAP extents, and hole punching.

fallocate(2) through libc deallocates ranges (Python's os module has no PUNCH_HOLE). FIEMAP
(<linux/fiemap.h>) gives the physical layout of a file, which tells allocated-but-unwritten
extents (old blocks that SEEK_DATA reports as holes) and extents shared with another file
(reflinks, snapshots).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from nbd_plugin.osutil.blockdev import device_size, is_block_device

FS_IOC_FIEMAP = 0xC020660B
"""Map a file's logical extents to physical ones."""

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# struct fiemap: fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, fm_reserved
FIEMAP_HEAD = struct.Struct("=QQIIII")
# struct fiemap_extent: fe_logical, fe_physical, fe_length, fe_reserved64[2], fe_flags,
# fe_reserved[3]
FIEMAP_EXTENT = struct.Struct("=QQQ2QI3I")
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP_BATCH = 256

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
# int fallocate(int fd, int mode, off_t offset, off_t len); off_t is 64-bit here.
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range of a regular file (it keeps its size and reads as zeros there).

    OSError (with the errno) if the filesystem cannot; nothing to do for ``length`` <= 0.
    """
    if length <= 0:
        return
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def data_segments(fd: int, start: int, end: int) -> list[tuple[int, int, bool]]:
    """Split [start, end) into (offset, length, is_data) runs using SEEK_DATA/SEEK_HOLE.

    Where the filesystem cannot say (no SEEK_DATA, or any other error), everything is data.
    """
    runs: list[tuple[int, int, bool]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                return [(start, end - start, True)]
            data = end  # only a hole until the end of the file
        data = min(data, end)
        if data > pos:
            runs.append((pos, data - pos, False))
            pos = data
            continue
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        except OSError:  # cut short since SEEK_DATA (ENXIO), or cannot say: data
            hole = end
        runs.append((pos, hole - pos, True))
        pos = hole
    return runs


def first_hole(fd: int, start: int) -> int:
    """Offset of the first hole at or after ``start`` (the file size if there is none);
    ``start`` itself if the file now ends there or before (cut short since it was read: no
    data there, as ``data_segments`` says)."""
    try:
        return os.lseek(fd, start, os.SEEK_HOLE)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        return start


@dataclass(frozen=True)
class Extent:
    """A byte range of a file that holds blocks on the medium."""

    offset: int
    length: int
    shared: bool = False
    """Another file (reflink, snapshot) holds the same physical blocks."""


def _fiemap_raw(fd: int, size: int) -> list[tuple[int, int, int, int]] | None:
    """(logical, physical, length, flags) of every extent up to `size`; None without FIEMAP."""
    out: list[tuple[int, int, int, int]] = []
    start = 0
    flags = FIEMAP_FLAG_SYNC
    while start < size:
        req = bytearray(FIEMAP_HEAD.size + _FIEMAP_BATCH * FIEMAP_EXTENT.size)
        FIEMAP_HEAD.pack_into(req, 0, start, size - start, flags, 0, _FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, req)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                return None
            raise
        flags = 0
        mapped = FIEMAP_HEAD.unpack_from(req, 0)[3]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            fields = FIEMAP_EXTENT.unpack_from(req, FIEMAP_HEAD.size + i * FIEMAP_EXTENT.size)
            logical, physical, length, fe_flags = fields[0], fields[1], fields[2], fields[5]
            end = min(logical + length, size)
            if end > logical:
                out.append((logical, physical, end - logical, fe_flags))
            start = logical + length
            last = last or bool(fe_flags & FIEMAP_EXTENT_LAST)
        if last:
            break
    return out


def fiemap(fd: int, size: int) -> list[Extent] | None:
    """Every extent of the file that has blocks, written or not; None if FIEMAP is unsupported."""
    raw = _fiemap_raw(fd, size)
    if raw is None:
        return None
    return [Extent(lo, n, bool(f & FIEMAP_EXTENT_SHARED)) for lo, _, n, f in raw]


def physical_ranges(fd: int, *, shared_only: bool = False) -> list[tuple[int, int]]:
    """(physical offset, length) of the file's extents on its filesystem's device (only those
    FIEMAP flags shared, with `shared_only`); [] without FIEMAP."""
    raw = _fiemap_raw(fd, os.fstat(fd).st_size) or []
    return [(p, n) for _, p, n, f in raw if not shared_only or f & FIEMAP_EXTENT_SHARED]


def seek_extents(fd: int, size: int) -> list[Extent]:
    """Data extents by SEEK_DATA/SEEK_HOLE; the whole file where the filesystem cannot say."""
    return [Extent(off, n) for off, n, is_data in data_segments(fd, 0, size) if is_data]


def merge(extents: list[Extent]) -> list[Extent]:
    """Sorted, with touching or overlapping extents joined (shared if any part is shared)."""
    out: list[Extent] = []
    for e in sorted(extents, key=lambda x: x.offset):
        if out and e.offset <= out[-1].offset + out[-1].length:
            prev = out[-1]
            end = max(prev.offset + prev.length, e.offset + e.length)
            out[-1] = Extent(prev.offset, end - prev.offset, prev.shared or e.shared)
        else:
            out.append(e)
    return out


def allocated_extents(fd: int) -> list[Extent]:
    """What an overwrite must cover: the whole device, or every extent that has blocks.

    FIEMAP first: it also reports preallocated/unwritten extents, whose blocks may still hold
    old ciphertext although SEEK_DATA calls them holes. SEEK_DATA/SEEK_HOLE where FIEMAP is
    missing (tmpfs). Holes hold nothing and stay holes.
    """
    size = device_size(fd)
    if is_block_device(fd):
        return [Extent(0, size)] if size else []
    mapped = fiemap(fd, size)
    if mapped is None:
        mapped = seek_extents(fd, size)
    else:
        # Dirty page-cache data of a hole shows up in SEEK_DATA but FIEMAP_FLAG_SYNC flushed it.
        mapped += seek_extents(fd, size)
    return merge(mapped)
