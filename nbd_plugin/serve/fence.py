"""The lease's fence: nbdkit stops touching the image the moment its lease holder lets go.

On a PostgreSQL keystore a separate process holds the disk's cluster-wide lease
(keystore/services/lease.py). It creates a pipe, keeps the write end and hands the read end
to nbdkit (`fence=-FD`). Nothing is ever written into it: the write end closes when the
holder fences (its session is gone) or dies in any way (SIGKILL and OOM included: the kernel
closes it), and the read end then polls readable (POLLHUP). Every data request checks that
first, so once the holder is gone no request *starts*; one already past the check may still
finish, which is why a taker waits a grace period before serving (lease.GRACE).
"""

from __future__ import annotations

import os
import select
import stat

from nbd_plugin.errors import Fenced


class Fence:
    """Checks the read end `fd` of the holder's pipe; fenced for good once it closes."""

    def __init__(self, fd: int) -> None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise ValueError(f"fence=-{fd}: {exc.strerror}") from None
        if not stat.S_ISFIFO(mode):
            raise ValueError(f"fence=-{fd}: not a pipe")
        self.fd = fd
        self.fenced = False
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def check(self) -> None:
        """Raise Fenced if the holder has let go (one poll(2) with timeout 0: ~1 us)."""
        if not self.fenced and self._poll.poll(0):
            self.fenced = True
        if self.fenced:
            raise Fenced("the disk's lease is gone (its holder fenced or died): I/O refused")


def parse_fd(value: str) -> int:
    """`fence=-FD`: an inherited descriptor number (ValueError otherwise)."""
    if not value.startswith("-") or not value[1:].isdigit():
        raise ValueError(f"fence={value}: expected -FD (an inherited file descriptor)")
    return int(value[1:])
