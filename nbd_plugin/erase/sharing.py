"""Which files share an image's blocks (reflinks), so an erase can refuse and name them.

A reflinked copy (`cp --reflink`, XFS or btrfs) shares the image's physical blocks: an
overwrite of the image writes new blocks (copy-on-write) and the copy keeps the LUKS header
and keyslots, opening with the passphrase. FIEMAP flags such extents shared but does not say
with whom; the files in the image's own directory (on the same filesystem) are checked for
overlapping physical ranges, which is where copies are usually made. A sharer elsewhere
(another directory, a snapshot) is reported as "not found here".
"""

from __future__ import annotations

import os
import stat

from nbd_plugin.osutil.extents import physical_ranges

#: directory entries looked at, at most (a huge directory is not walked to the end)
MAX_CANDIDATES = 10_000
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _overlaps(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(p < q + m and q < p + n for p, n in a for q, m in b)


def sharers(path: str, fd: int) -> list[str]:
    """Files in `path`'s directory whose blocks overlap the shared blocks of `fd`."""
    mine = physical_ranges(fd, shared_only=True)
    if not mine:
        return []
    own = os.fstat(fd)
    directory = os.path.dirname(os.path.abspath(path))
    found = []
    try:
        entries = os.scandir(directory)
    except OSError:
        return []
    with entries:
        for n, entry in enumerate(entries):
            if n >= MAX_CANDIDATES:
                break
            try:
                fd2 = os.open(entry.path, _OPEN)
            except OSError:
                continue
            try:
                st = os.fstat(fd2)
                if not stat.S_ISREG(st.st_mode) or st.st_dev != own.st_dev:
                    continue
                if st.st_ino == own.st_ino:
                    continue
                if _overlaps(mine, physical_ranges(fd2, shared_only=True)):
                    found.append(entry.path)
            except OSError:
                continue
            finally:
                os.close(fd2)
    return sorted(found)
