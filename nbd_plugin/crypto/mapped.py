"""The image's payload mapped read-only, so the kernels decrypt straight out of the page cache.

A read through ``pread`` copies the page cache into the request's buffer and the kernel then
decrypts that buffer in place: two passes over the data, and for the copy the kernel's work
per page (~160 us per MiB here against ~85 us for the VAES decryption itself). With the
payload mapped (``ImageMap``), the kernel reads the ciphertext where the page cache holds it
and writes the plaintext into nbdkit's buffer: one pass, no system call. Writes still go
through ``pwrite`` (a mapped write would allocate blocks on a page fault, where a full disk
cannot be reported).

What a mapping adds is SIGBUS: touching a page that is gone (the file was truncated under us)
or that cannot be read (an I/O error) raises it instead of returning an error, and its
default action kills the server and every disk it serves. ``install_guard`` sets a SIGBUS
handler, compiled by numba (it runs in signal context: no Python, no allocation), that
looks the faulting address up among the registered mappings. Inside one, it:

1. sets the mapping's fault word (``ImageMap.guard``), which the kernels check before and
   after reading (``FAULTED``), so the request is served again through ``pread``, which says
   what is wrong in one line, and the disk never uses its mapping again;
2. maps an anonymous zero page over the faulting page, so the interrupted read resumes and
   finishes (on bytes that are then thrown away) instead of faulting forever.

A fault anywhere else restores the action that was there before the guard (the default:
the process dies, as it would have without us) and returns, so the access faults again
under it; a SIGBUS sent by ``kill`` is sent again, to meet that action. A mapping is
registered only while the guard is installed; ``ImageMap`` refuses (``MapUnavailable``) if
it cannot be, and the caller reads through ``pread`` as before. What the guard cannot do: a
SIGBUS handler installed after it (``faulthandler.enable()``; the server installs none)
takes the faults first, and if the handler's own mmap fails (no memory for a page table)
the fault gets the previous action.

A cut inside a page raises nothing: the page cache zeroes the rest of that page. The kernels
therefore also check the last word of every sector (``kernels._zero_words``), and check
again after decrypting, for a hole punched or a cut made meanwhile.

Two more things a mapping must not do here. The serving process locks its memory
(``serve/hardening``: mlockall with MCL_FUTURE | MCL_ONFAULT), which would pin every page of
the image ever read; the mapping is unlocked (``munlock``) as soon as it is made, so its
pages stay the kernel's cache, reclaimable as before. And it is excluded from core dumps
(MADV_DONTDUMP; the server is not dumpable anyway). Ciphertext is not a secret: the mapping
holds what the image file holds, never a key.

A mapping also holds the open file, and with it the image's lock (``serve/exclusive``),
until it is unmapped; the channels' arrays over it may outlive the disk. So ``close`` puts
anonymous zero pages in its place at once (the file and its lock are let go; a read still in
flight gets ``FAULTED``), and the address range is unmapped when its last array is gone.
"""

from __future__ import annotations

import ctypes
import mmap
import signal
import threading
import weakref
from typing import Any

import numpy as np
import numpy.typing as npt

SLOTS = 1024
"""Mappings the guard knows at once (a host server's disks); more are served by pread."""
_PAGE = mmap.PAGESIZE
_PROT_READ = 1
_MAP_SHARED = 0x01
_MAP_PRIVATE_ANONYMOUS_FIXED = 0x02 | 0x20 | 0x10
_MAP_NORESERVE = 0x4000
_MAP_FAILED = (1 << 64) - 1
_MADV_DONTDUMP = 16
_SA_SIGINFO = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
# the handler's own calls, typed for numba (which calls a ctypes function by its address)
_mmap = ctypes.CFUNCTYPE(
    ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int32,
    ctypes.c_int32, ctypes.c_int64, use_errno=True,
)(("mmap", _libc))  # fmt: skip
_raise = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32)(("raise", _libc))
_sigaction = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint64)(
    ("sigaction", _libc)
)


class _SigAction(ctypes.Structure):
    """glibc's ``struct sigaction`` (the same on every Linux port but MIPS)."""

    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("mask", ctypes.c_uint64 * 16),
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    ]


_table = np.zeros(2 * SLOTS, dtype=np.uint64)
"""Per slot: the mapping's first address and its end (0: free)."""
_guards = np.zeros(SLOTS, dtype=np.uint64)
"""Per slot: the mapping's fault word. They live as long as the process: a handler that
matched a slot just before it was freed still writes to a word that exists."""
_previous = _SigAction()
"""SIGBUS's action before the guard, restored for a fault outside every mapping."""
_lock = threading.Lock()
_handler: Any = None
_refused: str | None = None


class MapUnavailable(Exception):
    """The payload cannot be mapped or guarded here; the disk reads through pread."""


def _compile_handler() -> Any:
    import numba
    from llvmlite import ir

    types: Any = numba.types
    carray: Any = getattr(numba, "carray")  # noqa: B009 (not in numba's __all__)

    def _words_at_typer(typingctx: Any, addr: Any) -> Any:
        sig = types.CPointer(types.uint64)(types.uint64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], ir.IntType(64).as_pointer())

        return sig, codegen

    words_at: Any = numba.extending.intrinsic(_words_at_typer)
    table_at = np.uint64(_table.ctypes.data)
    guards_at = np.uint64(_guards.ctypes.data)
    previous_at = np.uint64(ctypes.addressof(_previous))
    slots, page_mask = SLOTS, ~np.uint64(_PAGE - 1)
    sigbus = np.int32(signal.SIGBUS)

    def handle(signum: Any, info: Any, context: Any) -> None:
        addr = carray(info, 3, dtype=np.uint64)[2]  # siginfo_t.si_addr
        code = carray(info, 3, dtype=np.int32)[2]  # si_code: > 0 if the kernel raised it
        table = carray(words_at(table_at), 2 * slots)
        for i in range(slots if code > 0 else 0):
            if table[2 * i] <= addr < table[2 * i + 1]:
                carray(words_at(guards_at), slots)[i] = np.uint64(1)
                page = addr & page_mask
                flags = np.int32(_MAP_PRIVATE_ANONYMOUS_FIXED)
                got = _mmap(page, np.uint64(_PAGE), np.int32(_PROT_READ), flags, np.int32(-1),
                            np.int64(0))  # fmt: skip
                if got == page:
                    return
                break
        _sigaction(sigbus, previous_at, np.uint64(0))  # not ours: fault again under it,
        if code <= 0:  # or, sent by kill(), again to ourselves (blocked until we return)
            _raise(sigbus)

    signature = types.void(types.int32, types.voidptr, types.voidptr)
    return numba.cfunc(signature)(handle)


def install_guard() -> str | None:
    """Install the SIGBUS guard in this process (once); None if it is, else why not."""
    global _handler, _refused
    with _lock:
        if _handler is not None or _refused is not None:
            return _refused
        try:
            handler = _compile_handler()
        except Exception as exc:  # numba or LLVM failing: reads go through pread
            _refused = f"the SIGBUS guard did not compile ({type(exc).__name__}: {exc})"
            return _refused
        action = _SigAction()
        action.handler = handler.address
        action.flags = _SA_SIGINFO
        if _libc.sigaction(signal.SIGBUS, ctypes.byref(action), ctypes.byref(_previous)) != 0:
            _refused = f"sigaction(SIGBUS) failed (errno {ctypes.get_errno()})"
            return _refused
        _handler = handler  # keeps the compiled handler alive for the process's life
        return None


def guarded() -> bool:
    with _lock:
        return _handler is not None


class ImageMap:
    """``length`` bytes of ``fd`` from ``start``, mapped read-only and guarded.

    ``image`` is the mapping as a read-only uint8 array whose index 0 is the file offset
    ``origin`` (``start`` rounded down to a page); ``guard`` is its fault word, 0 until a
    page of it faulted. ``close`` lets go of the file at once: a mapping holds the open file
    (and with it the image's lock, ``serve/exclusive``) until it is unmapped.
    """

    def __init__(self, fd: int, start: int, length: int) -> None:
        if not guarded():
            raise MapUnavailable("the SIGBUS guard is not installed")
        self.origin = start - start % _PAGE
        self._size = size = start + length - self.origin
        address = _mmap(0, size, _PROT_READ, _MAP_SHARED, fd, self.origin)
        if address == _MAP_FAILED:
            raise MapUnavailable(f"the image cannot be mapped (errno {ctypes.get_errno()})")
        self._address: int | None = address
        # under mlockall(MCL_FUTURE) the mapping is born locked: its pages are cache
        problem = None
        if _libc.munlock(address, size) != 0:
            problem = f"munlock failed (errno {ctypes.get_errno()})"
        try:
            slot = -1 if problem else _register(address, address + size)
        except MapUnavailable as exc:
            problem = str(exc)
        if problem is not None:
            _libc.munmap(address, size)
            raise MapUnavailable(problem)
        self._slot = slot
        _libc.madvise(address, size, _MADV_DONTDUMP)
        memory = (ctypes.c_uint8 * size).from_address(address)
        # once the last array over it is gone (never before: a read through it would fault
        # unguarded), the slot is freed and the range unmapped
        weakref.finalize(memory, _release, slot, address, size)
        self.image: npt.NDArray[np.uint8] = np.frombuffer(memoryview(memory), dtype=np.uint8)
        self.image.flags.writeable = False
        self.guard: npt.NDArray[np.uint64] = _guards[slot : slot + 1]

    def close(self) -> None:
        """Let go of the file: a read still in flight (there should be none) gets
        ``FAULTED``, and the address range is zero pages until its arrays are gone."""
        if self._address is None:
            return
        self.guard[0] = 1
        flags = _MAP_PRIVATE_ANONYMOUS_FIXED | _MAP_NORESERVE
        if _mmap(self._address, self._size, _PROT_READ, flags, -1, 0) != _MAP_FAILED:
            _unregister(self._slot, self._address)  # zero pages now: nothing left to guard
        # else (no memory even for that) the file stays mapped and guarded until the last
        # array over it is gone
        self._address = None
        self.image = np.zeros(0, dtype=np.uint8)


def _register(start: int, end: int) -> int:
    with _lock:
        for i in range(SLOTS):
            if _table[2 * i + 1] == 0:
                _guards[i] = 0
                _table[2 * i] = start
                _table[2 * i + 1] = end  # last: the handler sees a whole slot or none
                return i
    raise MapUnavailable(f"{SLOTS} images are mapped already")


def _unregister(slot: int, start: int) -> None:
    """Free ``slot`` if it still holds the mapping that starts at ``start`` (its range is
    still reserved until unmapped, so no other mapping can start there meanwhile)."""
    with _lock:
        if _table[2 * slot] == start and _table[2 * slot + 1] != 0:
            _table[2 * slot + 1] = 0  # first: the handler no longer matches it
            _table[2 * slot] = 0


def _release(slot: int, address: int, size: int) -> None:
    """The last array over a mapping is gone: free its slot, then unmap it."""
    _unregister(slot, address)
    _libc.munmap(address, size)


def mapped_count() -> int:
    """Mappings the guard knows now (for tests)."""
    with _lock:
        return int(np.count_nonzero(_table[1::2]))


def faulted(imap: ImageMap) -> bool:
    """Whether a page of ``imap`` faulted (the guard took it)."""
    return bool(imap.guard[0])


__all__ = [
    "SLOTS",
    "ImageMap",
    "MapUnavailable",
    "faulted",
    "guarded",
    "install_guard",
    "mapped_count",
]
