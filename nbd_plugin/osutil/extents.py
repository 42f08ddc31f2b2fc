"""Thin wrappers over the Linux calls erase needs and Python's os module lacks.

Block-device ioctls from <linux/fs.h>; fallocate(2) through libc for hole punching;
FIEMAP (<linux/fiemap.h>) for the physical layout of a file, which tells allocated-but-unwritten
extents (old blocks that SEEK_DATA reports as holes) and extents shared with another file
(reflinks, snapshots).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

# _IO(0x12, n) / _IOR(0x12, 114, size_t) from <linux/fs.h>.
BLKDISCARD = 0x1277
"""Discard (TRIM/UNMAP) a byte range of a block device."""
BLKSECDISCARD = 0x127D
"""Secure discard: the device must erase the blocks, not just unmap them."""
BLKZEROOUT = 0x127F
"""Zero a byte range with the device's own command (WRITE ZEROES/WRITE SAME) or plain writes."""
BLKSSZGET = 0x1268
"""Logical sector size of a block device."""
BLKGETSIZE64 = 0x80081272
"""Size of a block device in bytes."""
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

_U64_PAIR = struct.Struct("=QQ")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def is_block_device(fd: int) -> bool:
    """True when `fd` is a block device."""
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def device_size(fd: int) -> int:
    """Size in bytes of a block device (BLKGETSIZE64) or a regular file."""
    if is_block_device(fd):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("=Q", buf)[0])
    return os.fstat(fd).st_size


def logical_block_size(fd: int) -> int:
    """The alignment O_DIRECT needs: BLKSSZGET on a device, 4096 on a file (safe everywhere)."""
    if is_block_device(fd):
        buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
        return int(struct.unpack("=i", buf)[0])
    return 4096


def blk_range_ioctl(fd: int, request: int, offset: int, length: int) -> None:
    """BLKDISCARD / BLKSECDISCARD / BLKZEROOUT over [offset, offset+length)."""
    fcntl.ioctl(fd, request, _U64_PAIR.pack(offset, length))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a file range (the file keeps its size); OSError if the filesystem cannot."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def loop_device_of(path: str) -> str | None:
    """The /dev/loopN whose backing file is `path`, if one is attached."""
    st = os.stat(path)
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return None
    for name in names:
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        try:
            bst = os.stat(backing)
        except OSError:
            continue  # "(deleted)" or elsewhere in another mount namespace
        if (bst.st_dev, bst.st_ino) == (st.st_dev, st.st_ino):
            return f"/dev/{name}"
    return None


@dataclass(frozen=True)
class Extent:
    """A byte range of a file that holds blocks on the medium."""

    offset: int
    length: int
    shared: bool = False
    """Another file (reflink, snapshot) holds the same physical blocks."""


def fiemap(fd: int, size: int) -> list[Extent] | None:
    """Every extent of the file that has blocks, written or not; None if FIEMAP is unsupported."""
    out: list[Extent] = []
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
            logical, length, fe_flags = fields[0], fields[2], fields[5]
            end = min(logical + length, size)
            if end > logical:
                out.append(Extent(logical, end - logical, bool(fe_flags & FIEMAP_EXTENT_SHARED)))
            start = logical + length
            last = last or bool(fe_flags & FIEMAP_EXTENT_LAST)
        if last:
            break
    return out


def seek_extents(fd: int, size: int) -> list[Extent]:
    """Data extents by SEEK_DATA/SEEK_HOLE; the whole file where the filesystem cannot say."""
    out: list[Extent] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            if e.errno == errno.EINVAL:
                return [Extent(0, size)] if size else []
            raise
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        if hole > data:
            out.append(Extent(data, hole - data))
        pos = hole
    return out


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
