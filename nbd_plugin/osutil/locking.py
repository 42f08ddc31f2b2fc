"""One writer per image: advisory flock on the image file, and QEMU's own image locks.

A read-write server holds LOCK_EX, a read-only server LOCK_SH, an erase or a keyslot change
LOCK_EX. Each also takes the byte-range locks QEMU's file driver takes (osutil/qemulocks.py),
so a QEMU opening the image as a file is refused, and a QEMU holding it refuses us: flock and
QEMU's OFD locks do not see each other. Both kinds belong to the open file description, so
they survive nbdkit's fork into the background and vanish when the last process holding the
descriptor exits (no stale locks).
"""

from __future__ import annotations

import errno
import fcntl

from nbd_plugin.errors import ImageBusy
from nbd_plugin.osutil import qemulocks


def hold_image(fd: int, path: str, *, exclusive: bool) -> None:
    """Lock ``fd`` without waiting, or raise ImageBusy naming the image."""
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        what = "read-write" if exclusive else "read-only"
        raise ImageBusy(
            f"{path} is in use by another process (a read-write server, an erase or a keyslot "
            f"change holds its lock), so it cannot be opened {what}; stop that process first, "
            f"or serve it read-only (nbdkit -r) alongside other read-only servers"
        ) from None
    try:
        conflict = qemulocks.take(fd, exclusive=exclusive)
    except BaseException:
        fcntl.flock(fd, fcntl.LOCK_UN)
        raise
    if conflict is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        raise ImageBusy(
            f"{path} is open in QEMU or another program using QEMU's image locks "
            f"({qemulocks.describe(conflict)}, lock byte {conflict}): shut that VM or "
            f"qemu-img/qemu-io down first; vmshield serves an image only while nothing else "
            f"has it open"
        )


def release_image(fd: int) -> None:
    """Drop the locks early (closing the descriptor also does)."""
    qemulocks.drop(fd)
    fcntl.flock(fd, fcntl.LOCK_UN)
