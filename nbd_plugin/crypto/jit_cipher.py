"""Sector ciphers whose every request is one call of a numba kernel (``kernels``).

A request costs a pool pop, one store (the first IV into the prepared context) and the
kernel call ``kernel(state, src, dst)`` on the buffers as they come (no numpy view), which
holds no GIL while it runs: reads decrypt in place in nbdkit's buffer, other threads run
meanwhile. Keyed contexts and the kernel's scratch come in sets from a pool (an
``EVP_CIPHER_CTX`` must not be used by two threads at once); ``list.pop``/``append`` are
atomic, so the pool needs no lock. Each cipher checks itself against the numpy/cryptography
path when it is made; ``SelfCheckFailed`` then sends the caller to that path.
"""

from __future__ import annotations

import ctypes
import functools
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from nbd_plugin.crypto import jit, vaes
from nbd_plugin.crypto.layout import (
    ENCRYPT,
    ERRNO,
    FAILED,
    HEAD,
    INIT,
    MASK,
    OS_ERROR,
    PREAD,
    PWRITE,
    SHORT,
    STEP,
    UPDATE,
    WORDS,
)
from nbd_plugin.crypto.libcrypto import EcbContext, XtsContext, init_address, update_address

if TYPE_CHECKING:  # importing kernels imports numba: only once jit has chosen its cache
    from nbd_plugin.crypto import kernels

U64 = npt.NDArray[np.uint64]
MASK64 = (1 << 64) - 1
CHUNK_BYTES = 32 << 10
"""Sectors per kernel chunk: their tweaks (or CBC output) stay in the L1/L2 cache."""
POOL = 8
OUT_MIN = 64 << 10
"""The smallest write scratch of a context set (bytes)."""
XTS_KERNELS = ("vaes-xts", "openssl-xts", "aes-ecb")
"""The numba path's XTS kernels (``xts_native``), fastest first."""
SECTOR_KERNEL_FROM = 512
"""Sector size from which XTS runs on OpenSSL's XTS per sector rather than on tweaks + ECB.
Measured in-process per 64 KiB: 4096-byte sectors 14 against 28-30 us, 1024 and 2048 ~19
against ~28-37, 512 26-27 against 28-29 us (docs/performance.md)."""


def xts_kernel_for(sector_size: int) -> str:
    """The kernel an XTS image with this sector size runs on, on the numba path: "vaes-xts"
    where the CPU has VAES and AVX-512 (every LUKS sector size), else OpenSSL's XTS per
    sector, else (units below 512 bytes, or, without VAES, a key whose halves are equal, which
    only test vectors have) "aes-ecb"."""
    if sector_size % vaes.STEP_BYTES == 0 and vaes.unavailable() is None:
        return "vaes-xts"
    return "openssl-xts" if sector_size >= SECTOR_KERNEL_FROM else "aes-ecb"


@functools.cache
def _file_io_addresses() -> tuple[int, int, int]:
    """Addresses of libc's ``pread``, ``pwrite`` and ``__errno_location``, which the fused
    kernels call."""
    libc = ctypes.CDLL(None)
    names = ("pread", "pwrite", "__errno_location")
    pread, pwrite, errno = (ctypes.cast(getattr(libc, n), ctypes.c_void_p).value for n in names)
    if not pread or not pwrite or not errno:
        raise OSError("libc's pread, pwrite or __errno_location was not found")
    return pread, pwrite, errno


def failure(status: int) -> Exception:
    """What a kernel's ``FAILED`` or ``OS_ERROR - errno`` status raises (any other status is
    not a failure: ``SHORT`` and ``ZERO_HEAD`` are for the caller)."""
    if status == FAILED:
        return RuntimeError("libcrypto failed inside the numba kernel")
    errno = OS_ERROR - status
    return OSError(errno, os.strerror(errno))


def _bytes(buf: Any, writable: bool) -> memoryview:
    """``buf`` as what the kernels' entry points take without checking: a C-contiguous 1-D
    byte memoryview, writable where they write (TypeError or ValueError otherwise)."""
    view = buf if type(buf) is memoryview else memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")  # TypeError unless C-contiguous
    if not view.c_contiguous:
        raise ValueError("the buffer is not contiguous")
    if writable and view.readonly:
        raise TypeError("the destination buffer is read-only")
    return view


class SelfCheckFailed(Exception):
    """The kernel disagreed with the reference path on a test request (do not use it)."""


class ContextSet:
    """Keyed contexts and two prepared kernel states (decrypt, encrypt) for one request at a
    time; the subclass's ``keyed`` puts the context addresses into ``state``."""

    def __init__(self, cipher: JitCipher, scratch_words: int) -> None:
        self.contexts: list[EcbContext | XtsContext] = []  # kept alive while in use
        self.state: tuple[U64, U64] = (
            cipher.prepared(False, scratch_words),
            cipher.prepared(True, scratch_words),
        )
        self.out = memoryview(bytearray(0))
        """Where the fused write puts the ciphertext it writes (grown to the largest write)."""
        cipher.keyed(self)

    def out_for(self, length: int) -> memoryview:
        """``out``, at least ``length`` bytes long."""
        if len(self.out) < length:
            self.out = memoryview(bytearray(max(length, OUT_MIN)))
        return self.out

    def ecb(self, key: bytes, encrypt: bool) -> int:
        ctx = EcbContext(key, encrypt)
        self.contexts.append(ctx)
        return ctx.address

    def xts(self, key: bytes, encrypt: bool) -> int:
        ctx = XtsContext(key, encrypt)
        self.contexts.append(ctx)
        return ctx.address


class OwnCalls(NamedTuple):
    """The fused kernels with a context set of one caller's own (``JitCipher.own_calls``;
    states the kernel only reads may be shared), for one request at a time: what a
    connection of a serialized server calls per request instead of
    ``read_file``/``write_file``, without their pool and checks.

    The entries check nothing (``kernels._entry``): the caller passes C-contiguous 1-D byte
    memoryviews, writable for ``read``, and writes at most ``len(out)`` bytes at a time.
    Statuses: 0, ``ZERO_HEAD`` and ``SHORT`` as ``read_file`` describes (``write``'s
    ``SHORT``: nothing was written, the ciphertext is in ``out``); ``FAILED`` or
    ``OS_ERROR - errno``, which ``failure`` turns into the exception to raise.
    """

    read: Any
    """``read(read_state, view, fd, at, stride, first_iv)``: pread and decrypt in place."""
    write: Any
    """``write(write_state, src, out, fd, at, first_iv)``, ``src`` read-only (nbdkit's)."""
    write_writable: Any
    """``write`` for a writable ``src``."""
    mapped: Any
    """``mapped(read_state, view, image, guard, at, stride, first_iv)``: decrypt from the
    mapped payload (``kernels.Kernels.mapped``)."""
    read_state: U64
    write_state: U64
    out: memoryview
    contexts: ContextSet
    """Keeps the keyed contexts whose addresses the states hold alive."""


class JitCipher:
    """Whole sectors through ``kernel``; subclasses say how a ContextSet is keyed."""

    data_path = "numba"
    kernel_name = "?"
    """What runs the data, for ``nbdkit -v`` and ``image info`` (set by subclasses)."""

    def __init__(
        self, sector_size: int, iv_step: int, kernel: kernels.Kernels, scratch_words: int,
        *, shared_reads: bool = False,
    ) -> None:  # fmt: skip
        """``shared_reads``: the kernel only reads its state (no scratch, no libcrypto
        context), so reads share one state, without the pool, and ``own_calls`` shares both
        states; subclasses call ``_ready`` once keyed."""
        if sector_size % 16 or sector_size < 32:
            raise ValueError(f"unsupported sector size {sector_size}")
        update, init = update_address(), init_address()
        if update is None or init is None:
            raise OSError("the system libcrypto was not found")
        self.sector_size = sector_size
        self.iv_step = iv_step
        self._addresses = (update, init, *_file_io_addresses())
        self._words = sector_size // 8
        self._iv_mask = MASK64
        self._kernel = kernel
        self._calls = kernel.entries()
        self._scratch_words = scratch_words
        self._shared_reads = shared_reads
        self._pool: list[ContextSet] = []
        self.encrypt = self._direction(True)
        """Encrypt ``src`` (whole sectors) into ``dst`` (may be the same writable buffer)."""
        self.decrypt = self._direction(False)
        """Decrypt ``src`` (whole sectors) into ``dst`` (may be the same writable buffer)."""
        self.read_file: Callable[[memoryview, int, int, int, int], int] = self._unready
        """``read_file(view, fd, at, first_iv, stride)``: pread and decrypt in one call."""
        self.write_file: Callable[[memoryview, int, int, int], bytes | None] = self._unready
        """``write_file(src, fd, at, first_iv)``: encrypt and pwrite in one call."""

    @staticmethod
    def _unready(*args: Any) -> Any:
        raise RuntimeError("the cipher is not keyed yet")

    def _ready(self) -> None:
        """Make the first context set (failing now, not in a request) and the fused calls."""
        first = self._first = ContextSet(self, self._scratch_words)
        self._pool.append(first)
        self.read_file = self._reader(first.state[0] if self._shared_reads else None)
        self.write_file = self._writer()

    @staticmethod
    def chunk_scratch(sector_size: int) -> int:
        """Scratch words of the chunked kernels: IVs and one word per data word."""
        words = sector_size // 8
        return max(1, CHUNK_BYTES // sector_size) * (words + 2)

    def own_calls(self, out_bytes: int) -> OwnCalls:
        """A context set of the caller's own and the entries that use it, for writes of up to
        ``out_bytes``; its memory (``out_bytes``, the states) lives as long as the caller
        keeps it. Where the kernel only reads its states (``shared_reads``: the VAES kernel,
        whose states are the key schedules) the caller shares the first set's and owns only
        the write scratch: keying a set there is ~2 ms of Python per direction."""
        calls = self._calls
        if self._shared_reads:
            c = self._first
            out = memoryview(bytearray(max(out_bytes, OUT_MIN)))
        else:
            c = ContextSet(self, self._scratch_words)  # libcrypto contexts: 0.01-0.02 ms
            out = c.out_for(out_bytes)
        return OwnCalls(calls.read, calls.write_readonly, calls.write, calls.mapped, c.state[0],
                        c.state[1], out, c)  # fmt: skip

    def prepared(self, encrypt: bool, scratch_words: int) -> U64:
        """A kernel state with everything but the contexts filled in."""
        state = np.zeros(HEAD + scratch_words, dtype=np.uint64)
        state[UPDATE], state[INIT], state[PREAD], state[PWRITE], state[ERRNO] = self._addresses
        state[WORDS] = self._words
        state[STEP] = self.iv_step & MASK64
        state[MASK] = self._iv_mask
        state[ENCRYPT] = int(encrypt)
        return state

    def keyed(self, c: ContextSet) -> None:
        raise NotImplementedError

    def _direction(self, encrypt: bool) -> Callable[[Any, Any, int], None]:
        """``run(src, dst, first_iv)`` in one direction: one Python frame per request, its
        constants in the closure (a request of 4 KiB costs ~0.35 us of AES; every attribute
        lookup and call around it counts)."""
        kernel = (self._calls.run, self._calls.run_readonly)
        pool, size, words = self._pool, self.sector_size, self._scratch_words
        index = int(encrypt)

        def run(src: Any, dst: Any, first_iv: int) -> None:
            s = _bytes(src, dst is src)
            d = s if dst is src else _bytes(dst, True)
            n = len(s)
            if n % size:
                raise ValueError(f"length {n} is not a multiple of {size}")
            if len(d) != n:
                raise ValueError(f"dst holds {len(d)} bytes, src {n}")
            try:
                c = pool.pop()  # atomic; another thread may have taken the last one
            except IndexError:
                c = ContextSet(self, words)
            try:
                status = kernel[s.readonly](c.state[index], s, d, first_iv & MASK64)
            finally:
                if len(pool) < POOL:
                    pool.append(c)
            if status:
                raise RuntimeError("libcrypto failed inside the numba kernel")

        return run

    def _reader(self, shared: U64 | None) -> Callable[[memoryview, int, int, int, int], int]:
        """``read_file(view, fd, at, first_iv, stride)``: read ``len(view)`` bytes (whole
        sectors) of ``fd`` at ``at`` into ``view`` (a writable byte memoryview) and decrypt
        them in place, in one kernel call; ``first_iv`` in [0, 2^64). Returns 0 (plaintext
        in ``view``), ``ZERO_HEAD`` (one in every ``stride`` words read was zero: ciphertext
        in ``view``, the caller decrypts and looks for holes) or ``SHORT`` (the file ended:
        the caller reads again and says where); raises OSError with pread's errno. With
        ``shared``, every read runs on that one state."""
        read, pool, size = self._calls.read, self._pool, self.sector_size
        words = self._scratch_words

        def check(view: memoryview) -> None:
            # what the kernel's entry point does not check (kernels._entry); ndim first: a
            # 0-dim memoryview has no length
            if view.ndim != 1 or len(view) % size or view.readonly or view.format != "B" or (
                not view.c_contiguous
            ):  # fmt: skip
                raise ValueError("read_file needs a writable byte memoryview of whole sectors")

        if shared is not None:

            def read_shared(view: memoryview, fd: int, at: int, first_iv: int, stride: int) -> int:
                check(view)
                status: int = read(shared, view, fd, at, stride, first_iv)
                if status <= OS_ERROR:
                    raise failure(status)
                return status

            return read_shared

        def read_file(view: memoryview, fd: int, at: int, first_iv: int, stride: int) -> int:
            check(view)
            # the pool's pop and put-back are written out in each call, not a with-block:
            # a context manager costs ~0.3 us of a 4 KiB request's ~2.5 us of Python
            try:
                c = pool.pop()
            except IndexError:
                c = ContextSet(self, words)
            try:
                status: int = read(c.state[0], view, fd, at, stride, first_iv)
            finally:
                if len(pool) < POOL:
                    pool.append(c)
            if status == FAILED or status <= OS_ERROR:
                raise failure(status)
            return status

        return read_file

    def _writer(self) -> Callable[[memoryview, int, int, int], bytes | None]:
        """``write_file(src, fd, at, first_iv)``: encrypt ``src`` (a byte memoryview of whole
        sectors) and pwrite the ciphertext to ``fd`` at ``at``, in one kernel call;
        ``first_iv`` in [0, 2^64). Returns None, or the ciphertext if pwrite wrote nothing
        (the caller writes it again); raises OSError with pwrite's errno."""
        write = (self._calls.write, self._calls.write_readonly)
        pool, size, words = self._pool, self.sector_size, self._scratch_words

        def write_file(src: memoryview, fd: int, at: int, first_iv: int) -> bytes | None:
            if src.ndim != 1 or len(src) % size or src.format != "B" or not src.c_contiguous:
                raise ValueError("write_file needs a byte memoryview of whole sectors")
            n = len(src)
            try:
                c = pool.pop()
            except IndexError:
                c = ContextSet(self, words)
            unwritten = None
            try:  # the context set goes back to the pool even if growing ``out`` fails
                out = c.out
                if len(out) < n:
                    out = c.out_for(n)
                status: int = write[src.readonly](c.state[1], src, out, fd, at, first_iv)
                if status == SHORT:  # copied before ``out`` goes back to the pool
                    unwritten = bytes(out[:n])
            finally:
                if len(pool) < POOL:
                    pool.append(c)
            if status == FAILED or status <= OS_ERROR:
                raise failure(status)
            return unwritten

        return write_file

    def self_check(self, reference: Any) -> None:
        """Encrypt and decrypt a few sectors (more than one chunk) against ``reference``."""
        sectors = CHUNK_BYTES // self.sector_size + 3
        words = np.arange(sectors * self._words, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        plain = words.astype("<u8").tobytes()
        first = MASK64 - 2  # crosses the 2^64 wrap of plain64
        want = bytearray(len(plain))
        reference.encrypt(plain, want, first)
        got = bytearray(len(plain))
        self.encrypt(plain, got, first)
        if got != want:
            raise SelfCheckFailed("encryption differs from the reference path")
        self.decrypt(got, got, first)
        if bytes(got) != plain:
            raise SelfCheckFailed("decryption does not invert encryption")
        self._check_file_calls(plain, bytes(want), first)

    def _check_file_calls(self, plain: bytes, want: bytes, first: int) -> None:
        """The fused write and read through a memory file against the reference's bytes."""
        fd = os.memfd_create("vmshield-self-check", os.MFD_CLOEXEC)
        try:
            if self.write_file(memoryview(plain), fd, self.sector_size, first) is not None:
                raise SelfCheckFailed("the fused write did not write")
            if os.pread(fd, len(want) + 1, self.sector_size) != want:
                raise SelfCheckFailed("the fused write differs from the reference path")
            got = bytearray(len(plain))
            status = self.read_file(memoryview(got), fd, self.sector_size, first, 0)
            if status or bytes(got) != plain:
                raise SelfCheckFailed("the fused read does not invert the fused write")
        finally:
            os.close(fd)


def _checked(make: Callable[[], JitCipher], fallback: Any) -> Any:
    """``make()`` if it agrees with ``fallback`` on a test request; else ``fallback``, and
    the process's data path becomes "numpy" with the reason."""
    try:
        cipher = make()
        cipher.self_check(fallback)
    except (SelfCheckFailed, OSError, MemoryError) as exc:
        jit.demote(f"the numba kernel failed its self-check ({exc})")
        return fallback
    return cipher


class Warming:
    """A cipher on the numpy path until the kernels are loaded, then on the numba one.

    ``encrypt``/``decrypt`` are the current cipher's bound methods, set on the instance: a
    request costs no extra call, and one in flight during the switch finishes on the cipher
    it started with (both give the same bytes).
    """

    def __init__(self, cipher: Any) -> None:
        self.use(cipher)

    def use(self, cipher: Any) -> None:
        self.cipher = cipher
        self.sector_size: int = cipher.sector_size
        self.encrypt = cipher.encrypt
        self.decrypt = cipher.decrypt
        self.read_file: Any = getattr(cipher, "read_file", None)
        """The numba cipher's fused read, None on the numpy path."""
        self.write_file: Any = getattr(cipher, "write_file", None)

    def own_calls(self, out_bytes: int) -> OwnCalls | None:
        """The numba cipher's ``own_calls``; None while still on the numpy path."""
        make = getattr(self.cipher, "own_calls", None)
        return None if make is None else make(out_bytes)

    @property
    def data_path(self) -> str:
        return str(self.cipher.data_path)

    @property
    def kernel_name(self) -> str:
        return str(self.cipher.kernel_name)


def jitted(make: Callable[[], JitCipher], reference: Callable[[], Any]) -> Any:
    """The numba cipher ``make()`` if this process runs that data path (checked against
    ``reference()``, the numpy/cryptography cipher), else ``reference()``. While the kernels
    are still loading (``jit.defer``), a ``Warming`` cipher that switches when they are."""
    status = jit.status()
    if (status == "undecided" and jit.kernels() is None) or status == "numpy":
        return reference()
    fallback = reference()
    if status != "loading":
        return _checked(make, fallback)
    warming = Warming(fallback)
    ref = weakref.ref(warming)

    def switch() -> None:
        w = ref()
        if w is not None and jit.status() == "numba":
            w.use(_checked(make, fallback))

    jit.when_decided(switch)
    return warming
