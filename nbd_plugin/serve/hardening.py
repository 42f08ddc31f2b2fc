"""Keep the master key out of core dumps, ptrace and swap, as far as a Python process can.

`harden_process()` runs when nbdkit loads the plugin, before any passphrase is read:

- prctl(PR_SET_DUMPABLE, 0): no core dump, and /proc/PID/{mem,environ,maps...} and ptrace
  become root-only even for the user the server runs as;
- RLIMIT_CORE 0 (soft and hard): a second line should something make the process dumpable.

`lock_secret(buf)` mlocks the pages of a bytearray we own (so they are never swapped out)
and marks them MADV_DONTDUMP. What Python cannot guarantee: the interpreter copies bytes
objects freely (the passphrase as read, its encoding), the master key lives in the cipher
objects of nbd_plugin.crypto and inside OpenSSL's key schedule, and freed memory is not
cleared. Those copies are protected only by the process-wide settings above (no core, no
ptrace) and by the systemd unit (LimitCORE=0, MemorySwapMax=0): not by mlock.
"""

from __future__ import annotations

import ctypes
import mmap
import resource

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
MADV_DONTDUMP = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def harden_process() -> list[str]:
    """No core dumps, not dumpable; returns what could not be done (one line each)."""
    failed = []
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0) != 0:
        failed.append(f"prctl(PR_SET_DUMPABLE, 0) failed (errno {ctypes.get_errno()})")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        failed.append(f"setrlimit(RLIMIT_CORE, 0) failed ({exc})")
    return failed


def dumpable() -> bool:
    """Whether this process may dump core (PR_GET_DUMPABLE)."""
    return bool(_libc.prctl(PR_GET_DUMPABLE, 0, 0, 0))


def lock_secret(buf: bytearray) -> bool:
    """mlock the pages holding `buf` and exclude them from core dumps; False if refused.

    The pages stay locked after `buf` is freed (other objects may share them): a few pages.
    """
    if not buf:
        return True
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    start = addr - addr % mmap.PAGESIZE
    length = addr + len(buf) - start
    locked = bool(_libc.mlock(start, length) == 0)
    _libc.madvise(start, length, MADV_DONTDUMP)
    return locked
