"""One writer per image: advisory flock on the image file.

A read-write server holds LOCK_EX, a read-only server LOCK_SH, an erase or a keyslot change
LOCK_EX. Locks belong to the open file description, so they survive nbdkit's fork into the
background and vanish when the last process holding the descriptor exits (no stale locks).
"""

from __future__ import annotations

import errno
import fcntl

from nbd_plugin.errors import ImageBusy


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


def release_image(fd: int) -> None:
    """Drop the lock early (closing the descriptor also does)."""
    fcntl.flock(fd, fcntl.LOCK_UN)
