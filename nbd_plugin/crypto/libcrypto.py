"""The system libcrypto through ctypes: OpenSSL's XTS per sector, and keyed AES-ECB contexts.

``NativeXts`` (the fallback data path, used when numba is missing):

For small requests this beats the vectorised numpy path (``nbd_plugin.crypto.xts``): a 4 KiB
request is 8 sectors, i.e. 16 cheap foreign calls, where numpy pays ~20 calls of fixed
overhead to build tweaks. Large requests stay on numpy (one call per 512-byte sector costs
~1.4 us; numpy amortises its overhead over the whole request).

This uses libcrypto's C API (``EVP_CipherInit_ex`` to set each sector's IV, ``EVP_Cipher``
to run it), not cryptography's public API. ``NativeXts.create`` returns None when the
library, a symbol or the self-check is missing or wrong; callers then use numpy for every
size. Contexts are kept in a pool: an EVP_CIPHER_CTX must not be used by two threads at once.

``EcbContext`` and ``update_address`` serve the numba kernels (``nbd_plugin.crypto.kernels``):
an AES-ECB context keyed once (padding off), and the address of ``EVP_CipherUpdate``, which
the compiled kernel calls directly, without Python and without the GIL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import weakref
from typing import Any

import numpy as np

_LIB: Any = None
_LIB_LOCK = threading.Lock()
POOL = 4


def _library() -> Any:
    """The system libcrypto with the few prototypes we call, or None."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is None:
            _LIB = False
            name = ctypes.util.find_library("crypto")
            if name:
                try:
                    lib = ctypes.PyDLL(name)
                    vp, i = ctypes.c_void_p, ctypes.c_int
                    lib.EVP_CIPHER_CTX_new.restype = vp
                    lib.EVP_CIPHER_CTX_new.argtypes = []
                    lib.EVP_CIPHER_CTX_free.restype = None
                    lib.EVP_CIPHER_CTX_free.argtypes = [vp]
                    lib.EVP_aes_128_xts.restype = vp
                    lib.EVP_aes_256_xts.restype = vp
                    lib.EVP_CipherInit_ex.restype = i
                    lib.EVP_CipherInit_ex.argtypes = [vp, vp, vp, ctypes.c_char_p, vp, i]
                    lib.EVP_Cipher.restype = i
                    lib.EVP_Cipher.argtypes = [vp, vp, vp, ctypes.c_uint]
                    for bits in (128, 192, 256):
                        getattr(lib, f"EVP_aes_{bits}_ecb").restype = vp
                    lib.EVP_CIPHER_CTX_set_padding.restype = i
                    lib.EVP_CIPHER_CTX_set_padding.argtypes = [vp, i]
                    lib.EVP_CipherUpdate.restype = i
                    _LIB = lib
                except (OSError, AttributeError):
                    _LIB = False
        return _LIB or None


def address(buf: Any) -> int:
    """Address of a contiguous buffer (bytes, bytearray, memoryview, numpy array)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # writable: 0.3 us
    except TypeError:  # read-only (bytes, nbdkit's write buffer): 2 us
        return int(np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0])


def update_address() -> int | None:
    """Address of ``EVP_CipherUpdate(ctx, out, &outl, in, inl)``, or None without libcrypto."""
    lib = _library()
    if lib is None:
        return None
    address: int | None = ctypes.cast(lib.EVP_CipherUpdate, ctypes.c_void_p).value
    return address


def init_address() -> int | None:
    """Address of ``EVP_CipherInit_ex(ctx, type, impl, key, iv, enc)``, or None."""
    lib = _library()
    if lib is None:
        return None
    address: int | None = ctypes.cast(lib.EVP_CipherInit_ex, ctypes.c_void_p).value
    return address


class EcbContext:
    """An AES-ECB context keyed once, padding off; ``address`` is the EVP_CIPHER_CTX *.

    Freed when the object goes; whoever holds ``address`` must hold the object too.
    """

    def __init__(self, key: bytes, encrypt: bool) -> None:
        lib = _library()
        if lib is None:
            raise OSError("the system libcrypto was not found")
        if len(key) not in (16, 24, 32):
            raise ValueError("AES needs a 128-, 192- or 256-bit key")
        cipher = getattr(lib, f"EVP_aes_{len(key) * 8}_ecb")()
        ctx = lib.EVP_CIPHER_CTX_new()
        if not ctx:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        self._finalizer = weakref.finalize(self, _free, lib, ctx)
        if lib.EVP_CipherInit_ex(ctx, cipher, None, bytes(key), None, int(encrypt)) != 1:
            raise ValueError("libcrypto refused the AES-ECB key")
        if lib.EVP_CIPHER_CTX_set_padding(ctx, 0) != 1:
            raise ValueError("libcrypto cannot turn ECB padding off")
        self.address: int = ctx


class XtsContext:
    """An AES-XTS context keyed once for one direction; ``address`` is the EVP_CIPHER_CTX *.

    Each use sets a sector's IV (``EVP_CipherInit_ex`` with only the IV) and runs one whole
    sector (``EVP_CipherUpdate``). OpenSSL refuses to encrypt under a key whose two halves
    are equal: ValueError then. Freed when the object goes, like ``EcbContext``.
    """

    def __init__(self, key: bytes, encrypt: bool) -> None:
        lib = _library()
        if lib is None:
            raise OSError("the system libcrypto was not found")
        if len(key) not in (32, 64):
            raise ValueError("XTS needs a 256- or 512-bit key (two AES-128 or AES-256 keys)")
        cipher = lib.EVP_aes_128_xts() if len(key) == 32 else lib.EVP_aes_256_xts()
        ctx = lib.EVP_CIPHER_CTX_new()
        if not ctx:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        self._finalizer = weakref.finalize(self, _free, lib, ctx)
        iv = bytes(16)
        if lib.EVP_CipherInit_ex(ctx, cipher, None, bytes(key), iv, int(encrypt)) != 1:
            raise ValueError("libcrypto refused the AES-XTS key")
        self.address: int = ctx


class _Contexts:
    """An encrypt and a decrypt context keyed once, plus a buffer for the sector IVs."""

    def __init__(self, lib: Any, cipher: int, key: bytes, capacity: int) -> None:
        self.enc = lib.EVP_CIPHER_CTX_new()
        self.dec = lib.EVP_CIPHER_CTX_new()
        self._finalizer = weakref.finalize(self, _free, lib, self.enc, self.dec)
        if not self.enc or not self.dec:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        for ctx, enc in ((self.enc, 1), (self.dec, 0)):
            if lib.EVP_CipherInit_ex(ctx, cipher, None, key, None, enc) != 1:
                raise ValueError("libcrypto refused the XTS key")
        self.ivs = np.zeros((capacity, 2), dtype=np.uint64)
        self.ivs_at = int(self.ivs.ctypes.data)


def _free(lib: Any, *contexts: int) -> None:
    for ctx in contexts:
        if ctx:
            lib.EVP_CIPHER_CTX_free(ctx)


class NativeXts:
    """Per-sector AES-XTS for requests of up to ``capacity`` sectors."""

    def __init__(self, lib: Any, key: bytes, sector_size: int, iv_step: int, capacity: int):
        self._lib = lib
        self._cipher = lib.EVP_aes_128_xts() if len(key) == 32 else lib.EVP_aes_256_xts()
        self._key = bytes(key)
        self.sector_size = sector_size
        self.capacity = capacity
        self._steps = np.arange(capacity, dtype=np.uint64) * np.uint64(iv_step)
        self._pool: list[_Contexts] = []
        self._lock = threading.Lock()
        self._release(self._take())  # fail now, not on the first request

    @classmethod
    def create(cls, key: bytes, sector_size: int, iv_step: int, capacity: int) -> NativeXts | None:
        """A native cipher, or None if this system's libcrypto cannot provide one."""
        lib = _library()
        if lib is None or len(key) not in (32, 64):
            return None
        try:
            return cls(lib, key, sector_size, iv_step, capacity)
        except (ValueError, MemoryError):
            return None

    def _take(self) -> _Contexts:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return _Contexts(self._lib, self._cipher, self._key, self.capacity)

    def _release(self, c: _Contexts) -> None:
        with self._lock:
            if len(self._pool) < POOL:
                self._pool.append(c)

    def apply(self, encrypt: bool, src: Any, dst: Any, sectors: int, first_iv: int) -> None:
        """En/decrypt ``sectors`` whole sectors of ``src`` into ``dst`` (may be the same)."""
        c = self._take()
        try:
            column = c.ivs[:sectors, 0]
            np.add(self._steps[:sectors], np.uint64(first_iv % (1 << 64)), out=column)
            ctx = c.enc if encrypt else c.dec
            init, run = self._lib.EVP_CipherInit_ex, self._lib.EVP_Cipher
            size = self.sector_size
            src_at, dst_at, iv_at = address(src), address(dst), c.ivs_at
            for j in range(sectors):
                init(ctx, None, None, None, iv_at + 16 * j, -1)
                if run(ctx, dst_at + size * j, src_at + size * j, size) <= 0:
                    raise RuntimeError("libcrypto AES-XTS failed")
        finally:
            self._release(c)
