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

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from nbd_plugin.crypto import jit, vaes
from nbd_plugin.crypto.layout import ENCRYPT, HEAD, INIT, IV, MASK, STEP, UPDATE, WORDS
from nbd_plugin.crypto.libcrypto import EcbContext, XtsContext, init_address, update_address

U64 = npt.NDArray[np.uint64]
MASK64 = (1 << 64) - 1
CHUNK_BYTES = 32 << 10
"""Sectors per kernel chunk: their tweaks (or CBC output) stay in the L1/L2 cache."""
POOL = 8
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


def _bytes(buf: Any) -> memoryview:
    """A 1-D byte view of any contiguous buffer (a memoryview of another format, bytes...)."""
    view = buf if type(buf) is memoryview else memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


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
        cipher.keyed(self)

    def ecb(self, key: bytes, encrypt: bool) -> int:
        ctx = EcbContext(key, encrypt)
        self.contexts.append(ctx)
        return ctx.address

    def xts(self, key: bytes, encrypt: bool) -> int:
        ctx = XtsContext(key, encrypt)
        self.contexts.append(ctx)
        return ctx.address


class JitCipher:
    """Whole sectors through ``kernel``; subclasses say how a ContextSet is keyed."""

    data_path = "numba"
    kernel_name = "?"
    """What runs the data, for ``nbdkit -v`` and ``image info`` (set by subclasses)."""

    def __init__(self, sector_size: int, iv_step: int, kernel: Any, scratch_words: int) -> None:
        if sector_size % 16 or sector_size < 32:
            raise ValueError(f"unsupported sector size {sector_size}")
        update, init = update_address(), init_address()
        if update is None or init is None:
            raise OSError("the system libcrypto was not found")
        self.sector_size = sector_size
        self.iv_step = iv_step
        self._addresses = (update, init)
        self._words = sector_size // 8
        self._iv_mask = MASK64
        self._kernel = kernel
        self._scratch_words = scratch_words
        self._pool: list[ContextSet] = []
        self.encrypt = self._direction(True)
        """Encrypt ``src`` (whole sectors) into ``dst`` (may be the same writable buffer)."""
        self.decrypt = self._direction(False)
        """Decrypt ``src`` (whole sectors) into ``dst`` (may be the same writable buffer)."""

    @staticmethod
    def chunk_scratch(sector_size: int) -> int:
        """Scratch words of the chunked kernels: IVs and one word per data word."""
        words = sector_size // 8
        return max(1, CHUNK_BYTES // sector_size) * (words + 2)

    def prepared(self, encrypt: bool, scratch_words: int) -> U64:
        """A kernel state with everything but the contexts and the IV filled in."""
        state = np.zeros(HEAD + scratch_words, dtype=np.uint64)
        state[UPDATE], state[INIT] = self._addresses
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
        kernel, pool, size, words = self._kernel, self._pool, self.sector_size, self._scratch_words
        index = int(encrypt)

        def run(src: Any, dst: Any, first_iv: int) -> None:
            s = src if type(src) is memoryview and src.format == "B" else _bytes(src)
            d = s if dst is src else (
                dst if type(dst) is memoryview and dst.format == "B" else _bytes(dst)
            )  # fmt: skip
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
                state = c.state[index]
                state[IV] = first_iv & MASK64
                status = kernel(state, s, d)
            finally:
                if len(pool) < POOL:
                    pool.append(c)
            if status:
                raise RuntimeError("libcrypto failed inside the numba kernel")

        return run

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
