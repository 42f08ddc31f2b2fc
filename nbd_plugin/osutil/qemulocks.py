"""QEMU's image locking, spoken from our side, so a QEMU refuses an image vmshield holds.

flock (osutil/locking.py) and QEMU's locks do not see each other: QEMU's file driver
(block/file-posix.c, "image locking") takes open-file-description byte-range locks
(F_OFD_SETLK, shared read locks of one byte each), not flock. Its protocol, per permission
bit ``i`` of the block layer (0 consistent-read, 1 write, 2 write-unchanged, 3 resize; older
QEMUs had 4 graph-mod):

- byte ``100 + i`` is read-locked by every opener that *holds* permission ``i``;
- byte ``200 + i`` is read-locked by every opener that does *not share* permission ``i``;
- an opener then tests (F_OFD_GETLK for a write lock) byte ``200 + i`` for every permission
  it wants and byte ``100 + i`` for every permission it does not share: any lock held by
  someone else there is a conflict ("Failed to get "write" lock").

An exclusive holder (a read-write server, an erase, a keyslot change) holds every permission
and shares none; a shared holder (a read-only server) holds consistent-read and shares
neither write, write-unchanged nor resize, so a read-only QEMU may still open the file beside
it, a writing one may not. Before taking them we test the same bytes QEMU would, so a QEMU
already holding the image stops us. The locks belong to the open file description: they
survive nbdkit's fork and vanish with the last descriptor. QEMU's ``locking=off`` and
``force-share=on`` (qemu-img -U) skip all of this: only file permissions stop those.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

PERM_BASE = 100
SHARED_BASE = 200
#: permission bits covered: QEMU 7.2 has 4, older releases 5; the spare bytes cost nothing
PERM_COUNT = 8

CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0, 1, 2, 3

# struct flock on Linux x86-64/aarch64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (+ padding). l_pid must be 0 for the OFD commands.
_FLOCK = struct.Struct("hhqqi4x")


def _lock_bytes(*, exclusive: bool) -> tuple[list[int], list[int]]:
    """(bytes we read-lock, bytes we test for others' locks) for this kind of holder."""
    everything = list(range(PERM_COUNT))
    if exclusive:
        held, unshared = everything, everything
        wanted = everything
    else:
        held, unshared = [CONSISTENT_READ], [WRITE, WRITE_UNCHANGED, RESIZE]
        wanted = [CONSISTENT_READ]
    take = [PERM_BASE + i for i in held] + [SHARED_BASE + i for i in unshared]
    test = [SHARED_BASE + i for i in wanted] + [PERM_BASE + i for i in unshared]
    return take, test


def _fcntl(fd: int, cmd: int, kind: int, offset: int) -> int:
    arg = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)
    out = fcntl.fcntl(fd, cmd, arg)
    return int(_FLOCK.unpack(out)[0])


def conflicting_byte(fd: int, *, exclusive: bool) -> int | None:
    """The first lock byte another open file description holds that we would need, or None."""
    for off in _lock_bytes(exclusive=exclusive)[1]:
        if _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, off) != fcntl.F_UNLCK:
            return off
    return None


def take(fd: int, *, exclusive: bool) -> int | None:
    """Take QEMU's lock bytes for this kind of holder; the conflicting byte if refused."""
    off = conflicting_byte(fd, exclusive=exclusive)
    if off is not None:
        return off
    for off in _lock_bytes(exclusive=exclusive)[0]:
        try:
            _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, off)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            drop(fd)
            return off
    # a QEMU that tested between our test and our locks sees ours now; test again (as QEMU
    # does after applying its own) so one of the two always backs off
    off = conflicting_byte(fd, exclusive=exclusive)
    if off is not None:
        drop(fd)
    return off


def drop(fd: int) -> None:
    """Release every QEMU lock byte this open file description holds."""
    for base in (PERM_BASE, SHARED_BASE):
        arg = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, base, PERM_COUNT, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)


def describe(offset: int) -> str:
    """What a conflicting lock byte means, in QEMU's words."""
    names = {CONSISTENT_READ: "consistent read", WRITE: "write",
             WRITE_UNCHANGED: "write unchanged", RESIZE: "resize"}  # fmt: skip
    base = SHARED_BASE if offset >= SHARED_BASE else PERM_BASE
    name = names.get(offset - base, f"permission {offset - base}")
    return (f"a process holds the {name!r} permission" if base == PERM_BASE
            else f"a process does not share the {name!r} permission")  # fmt: skip
