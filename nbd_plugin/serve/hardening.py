"""Keep the master key out of core dumps, ptrace and swap, as far as a Python process can.

`harden_process()` runs when nbdkit loads the plugin, before any passphrase is read:

- prctl(PR_SET_DUMPABLE, 0): no core dump, and /proc/PID/{mem,environ,maps...} and ptrace
  become root-only even for the user the server runs as;
- RLIMIT_CORE 0 (soft and hard): a second line should something make the process dumpable.

`lock_secret(buf)` mlocks the pages of a bytearray we own (so they are never swapped out)
and marks them MADV_DONTDUMP. But mlock is not inherited across fork, and nbdkit forks into
the background after the plugin has read the passphrase and derived the master key; and the
master key's copies (the cipher objects of nbd_plugin.crypto, OpenSSL's key schedule, bytes
the interpreter made) cannot be found to mlock one by one. So `lock_all_memory()` runs in the
serving process (the plugin's after_fork): mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)
keeps every page of the server that is or becomes resident out of swap (ONFAULT: reserved
but untouched memory is not faulted in, so the locked size is the resident size, ~100-200
MiB with the numba kernels). Without CAP_IPC_LOCK the RLIMIT_MEMLOCK limit (often 8 MiB)
would make MCL_FUTURE fail later allocations, so an unprivileged server does not try and
says so: run it from the systemd unit (MemorySwapMax=0) or as root. Freed memory is still
not cleared. The `vmshield` command (keystore.cli.run) hardens and locks itself the same way.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
CAP_IPC_LOCK = 14
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
MADV_DONTDUMP = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mlockall.argtypes = [ctypes.c_int]


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


INITIAL_USER_NS = 0xEFFFFFFD
"""The inode of /proc/self/ns/user in the initial user namespace (the kernel's
PROC_USER_INIT_INO): a child namespace cannot have it, whatever its uid map says."""


def _has_ipc_lock() -> bool:
    """Is CAP_IPC_LOCK in our effective set, in the initial user namespace (where the kernel
    looks: inside another namespace, rootless podman's, CapEff shows it while RLIMIT_MEMLOCK
    still applies, and a lock under MCL_FUTURE would make later allocations fail)?"""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("CapEff:"))
        initial = os.stat("/proc/self/ns/user").st_ino == INITIAL_USER_NS
    except (OSError, StopIteration):
        return False
    return initial and bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)


def can_lock_memory() -> bool:
    """May this process lock all its memory: CAP_IPC_LOCK where the kernel honours it, or no
    RLIMIT_MEMLOCK? (A finite limit counts every mapped page, hundreds of MiB with the
    libraries; vmshield does not try under one: MCL_FUTURE would fail later allocations.)"""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return soft == resource.RLIM_INFINITY or _has_ipc_lock()


def lock_all_memory() -> str | None:
    """mlockall this process (current and future pages, on fault); None if done, else why
    not, as one clause (the caller says what may be swapped out and what to do)."""
    if not can_lock_memory():
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return f"RLIMIT_MEMLOCK is {soft} bytes and no CAP_IPC_LOCK in the initial user namespace"
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        return f"mlockall failed (errno {ctypes.get_errno()})"
    return None
