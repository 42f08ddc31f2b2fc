"""Sector ciphers whose every request is one call of a numba kernel (``kernels``).

A request costs a pool pop, one or two ``np.frombuffer`` views and the kernel call, which
holds no GIL while it runs: reads decrypt in place in nbdkit's buffer, other threads run
meanwhile. Keyed ECB contexts and the kernel's scratch come in sets from a pool (an
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

from nbd_plugin.crypto import jit
from nbd_plugin.crypto.libcrypto import EcbContext, update_address

U64 = npt.NDArray[np.uint64]
MASK64 = (1 << 64) - 1
CHUNK_BYTES = 32 << 10
"""Sectors per kernel chunk: their tweaks (or CBC output) stay in the L1/L2 cache."""
POOL = 8


class SelfCheckFailed(Exception):
    """The kernel disagreed with the reference path on a test request (do not use it)."""


class ContextSet:
    """ECB contexts and scratch for one request at a time; ``heads`` are the kernel's first
    arguments for (decrypt, encrypt)."""

    def __init__(self, scratch_words: int, heads: Callable[[ContextSet], tuple[Any, Any]]):
        self.contexts: list[EcbContext] = []  # kept alive while the kernel may use them
        self.scratch: U64 = np.zeros(scratch_words, dtype=np.uint64)
        self.heads = heads(self)

    def ecb(self, key: bytes, encrypt: bool) -> np.uint64:
        ctx = EcbContext(key, encrypt)
        self.contexts.append(ctx)
        return np.uint64(ctx.address)


class JitCipher:
    """Whole sectors through ``kernels[encrypt]``; subclasses say how a ContextSet is keyed."""

    data_path = "numba"

    def __init__(self, sector_size: int, iv_step: int, kernels: tuple[Any, Any]) -> None:
        if sector_size % 16 or sector_size < 32:
            raise ValueError(f"unsupported sector size {sector_size}")
        address = update_address()
        if address is None:
            raise OSError("the system libcrypto was not found")
        self.sector_size = sector_size
        self.iv_step = iv_step
        self._update = np.uint64(address)
        self._words = sector_size // 8
        self._step = np.uint64(iv_step & MASK64)
        self._tails: tuple[tuple[Any, ...], tuple[Any, ...]] = ((), ())
        """Kernel arguments after iv_step, for (decrypt, encrypt)."""
        self._kernels = kernels
        sectors = max(1, CHUNK_BYTES // sector_size)
        self._scratch_words = 2 + sectors * (self._words + 2)
        self._pool: list[ContextSet] = []

    def _heads(self, c: ContextSet) -> tuple[Any, Any]:
        raise NotImplementedError

    def _contexts(self) -> ContextSet:
        return ContextSet(self._scratch_words, self._heads)

    def _run(self, encrypt: bool, src: Any, dst: Any, first_iv: int) -> None:
        length = src.nbytes if isinstance(src, memoryview) else len(src)
        if length % self.sector_size:
            raise ValueError(f"length {length} is not a multiple of {self.sector_size}")
        s = np.frombuffer(src, dtype=np.uint64)
        d = s if dst is src else np.frombuffer(dst, dtype=np.uint64)
        if d.size != s.size:
            raise ValueError(f"dst holds {d.size * 8} bytes, src {length}")
        pool = self._pool
        try:
            c = pool.pop()
        except IndexError:
            c = self._contexts()
        try:
            status = self._kernels[encrypt](
                self._update,
                *c.heads[encrypt],
                s,
                d,
                self._words,
                np.uint64(first_iv & MASK64),
                self._step,
                *self._tails[encrypt],
                c.scratch,
            )
        finally:
            if len(pool) < POOL:
                pool.append(c)
        if status:
            raise RuntimeError("libcrypto AES-ECB failed inside the numba kernel")

    def encrypt(self, src: Any, dst: Any, first_iv: int) -> None:
        """Encrypt ``src`` (whole sectors) into ``dst`` (may be the same writable buffer)."""
        self._run(True, src, dst, first_iv)

    def decrypt(self, src: Any, dst: Any, first_iv: int) -> None:
        """Decrypt ``src`` (whole sectors) into ``dst`` (may be the same writable buffer)."""
        self._run(False, src, dst, first_iv)

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
