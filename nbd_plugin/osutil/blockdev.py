"""Block devices: size, sector size, range ioctls (<linux/fs.h>) and loop-device lookup.

A regular file answers the same questions where it can (its size; 4096 for O_DIRECT
alignment), so callers need not tell the two apart.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct

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

_U64 = struct.Struct("=Q")
_U64_PAIR = struct.Struct("=QQ")
_INT = struct.Struct("=i")


def is_block_device(fd: int) -> bool:
    """True when ``fd`` is a block device."""
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def device_size(fd: int) -> int:
    """Size in bytes of a block device (BLKGETSIZE64) or a regular file (st_size)."""
    if is_block_device(fd):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, bytes(_U64.size))
        return int(_U64.unpack(buf)[0])
    return os.fstat(fd).st_size


def logical_block_size(fd: int) -> int:
    """The alignment O_DIRECT needs: BLKSSZGET on a device, 4096 on a file (safe everywhere)."""
    if is_block_device(fd):
        buf = fcntl.ioctl(fd, BLKSSZGET, bytes(_INT.size))
        return int(_INT.unpack(buf)[0])
    return 4096


def blk_range_ioctl(fd: int, request: int, offset: int, length: int) -> None:
    """BLKDISCARD / BLKSECDISCARD / BLKZEROOUT over [offset, offset+length)."""
    fcntl.ioctl(fd, request, _U64_PAIR.pack(offset, length))


def _backing_file(sysfs_block_dir: str) -> str | None:
    """What a loop device's sysfs directory names as its backing file (None: not a loop)."""
    try:
        with open(f"{sysfs_block_dir}/loop/backing_file") as f:
            return f.read().strip() or None
    except OSError:
        return None


def loop_backing_file(rdev: int) -> str | None:
    """The backing file of the block device ``rdev``, None if it is not a loop device."""
    return _backing_file(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")


def loop_device_of(path: str) -> str | None:
    """The /dev/loopN whose backing file is ``path``, if one is attached."""
    st = os.stat(path)
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return None
    for name in names:
        backing = _backing_file(f"/sys/block/{name}")
        if backing is None:
            continue
        try:
            bst = os.stat(backing)
        except OSError:
            continue  # "(deleted)" or elsewhere in another mount namespace
        if (bst.st_dev, bst.st_ino) == (st.st_dev, st.st_ino):
            return f"/dev/{name}"
    return None
