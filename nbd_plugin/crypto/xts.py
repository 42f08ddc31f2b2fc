"""AES-XTS over whole requests with numpy: the data path when numba is not there.

With numba, ``xts_native.JitXts`` runs each request in one compiled call; this module stays
the fallback (and the reference the numba cipher checks itself against at start).

Small requests (up to ``NATIVE_SECTORS`` sectors) and 4096-byte sectors go to OpenSSL's own
XTS one sector at a time through the system libcrypto (``nbd_plugin.crypto.libcrypto``), when it
is there and agrees with cryptography on a test sector; everything else, and everything when
it is not, takes the numpy path below, which uses only cryptography's public API.

XTS (IEEE 1619) encrypts block i of data unit j as ``E_K1(P xor D) xor D`` with
``D = T_j * alpha^i`` in GF(2^128) and ``T_j = E_K2(IV_j)``. Per request we make

1. one AES-ECB call under K2 that turns every sector IV (plain64: the little-endian sector
   number) into ``T_j``;
2. all ``T_j * alpha^s`` at once, for s < 32, from the closed form (``x^128 = x^7+x^2+x+1``)::

       hi_s = (hi << s) | (lo >> (64 - s))
       lo_s = (lo << s) ^ R(hi >> (64 - s)),   R(o) = o ^ o<<1 ^ o<<2 ^ o<<7

   as numpy broadcasts of a (c, 1) column of tweaks against a (32, 1) column of shift
   counts: each call covers every block of every sector of the request, its inner loop runs
   along c sectors with one scalar shift (numpy's fast path), and the number of numpy calls
   does not grow with the request. 4096-byte sectors (256 blocks) chain ``* alpha^32``;
3. two strided copies from those (chunk, word, block, sector) planes into the data's (sector,
   block, word) order; chunks of ``CHUNK`` sectors keep each transpose in cache;
4. data xor tweaks, one AES-ECB call under K1, xor tweaks again (contiguous, in place).

A data unit is a whole sector (512 or 4096 bytes): no ciphertext stealing. Scratch arrays
come from a small pool and are reused (nbdkit gives each callback a fresh thread state, so
the pool is a lock-protected list, not threading.local); cipher contexts are created once.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbd_plugin.crypto.libcrypto import NativeXts

BLOCK = 16
CHUNK = 128
"""Sectors per tweak plane: the transpose to data order works on (2, blocks, CHUNK) planes."""
SPAN = 32
"""Tweaks computed directly from T_j by the closed form (it holds for shifts below 57)."""
POOL = 4
MAX_VIEWS = 8
MAX_BYTES = 2 << 20
"""Larger requests go through the numpy path in pieces of this size, so a pooled scratch
never exceeds ~10 MiB."""
NATIVE_SECTORS = 32
"""Requests of up to this many 512-byte sectors go to OpenSSL's XTS one sector at a time
(``xts_libcrypto``) when the system libcrypto allows it: below ~36 sectors that beats numpy's
fixed cost. Sectors of 4096 bytes or more always do (one call per 4 KiB is cheap)."""
IV_MASK = (1 << 64) - 1
"""plain64 IVs are 64-bit: they wrap mod 2^64, as in dm-crypt."""

U64 = npt.NDArray[np.uint64]


def _reduce(over: U64, red: U64, tmp: U64) -> None:
    """red = R(over) = over * (x^7 + x^2 + x + 1), carry-less (over has at most 57 bits)."""
    np.left_shift(over, np.uint64(1), out=red)
    np.bitwise_xor(red, over, out=red)
    for k in (2, 7):
        np.left_shift(over, np.uint64(k), out=tmp)
        np.bitwise_xor(red, tmp, out=red)


def _slice(buf: Any, start: int, end: int) -> Any:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view if start == 0 and end == view.nbytes else view[start:end]


def _chunking(sectors: int) -> tuple[int, int]:
    """(chunks, chunk): sectors padded up to chunks * chunk, chunk <= CHUNK."""
    if sectors <= CHUNK:
        return 1, sectors
    return -(-sectors // CHUNK), CHUNK


class _Scratch:
    """Preallocated arrays and cipher contexts for requests of up to ``capacity`` sectors.

    Contexts live here, not on the cipher: cryptography's contexts must not be used by two
    threads at once, and a scratch belongs to one request at a time.
    """

    def __init__(self, capacity: int, blocks: int, data_key: bytes, tweak_key: bytes) -> None:
        self.capacity = capacity
        data = algorithms.AES(data_key)
        self.tweak_enc = Cipher(algorithms.AES(tweak_key), modes.ECB()).encryptor()
        self.enc = Cipher(data, modes.ECB()).encryptor()
        self.dec = Cipher(data, modes.ECB()).decryptor()
        self.ivs = np.zeros((capacity, 2), dtype=np.uint64)
        # cryptography's update_into wants len(out) >= len(data) + 15.
        self.first = bytearray(capacity * BLOCK + BLOCK)
        self.lohi = np.empty(capacity * 2, dtype=np.uint64)
        self.planes = np.empty(capacity * blocks * 2, dtype=np.uint64)
        self.over = np.empty(capacity * SPAN, dtype=np.uint64)
        self.red = np.empty(capacity * SPAN, dtype=np.uint64)
        self.tweaks = np.empty(capacity * blocks * 2, dtype=np.uint64)
        self.mixed = bytearray(capacity * blocks * BLOCK)
        # ECB's output: cryptography >= 51 refuses an update_into whose destination overlaps
        # its source, so the ciphertext of ``mixed`` lands here, not back in ``mixed``.
        self.ecb = bytearray(capacity * blocks * BLOCK + BLOCK)
        self.views: dict[tuple[int, int, int], _Views] = {}

    def views_for(self, chunks: int, chunk: int, sectors: int, blocks: int, span: int) -> _Views:
        """Views shaped for one request size, made once: requests repeat their sizes."""
        key = (chunks, chunk, sectors)
        v = self.views.get(key)
        if v is None:
            if len(self.views) >= MAX_VIEWS:
                self.views.clear()
            v = self.views[key] = _Views(self, chunks, chunk, sectors, blocks, span)
        return v


class _Views:
    """numpy views of a _Scratch for ``chunks * chunk`` sectors, ``sectors`` of them used."""

    def __init__(
        self, s: _Scratch, chunks: int, chunk: int, sectors: int, blocks: int, span: int
    ) -> None:
        padded = chunks * chunk
        self.iv_column = s.ivs[:padded, 0]
        self.iv_bytes = s.ivs[:padded].reshape(-1).view(np.uint8).data
        first = np.frombuffer(s.first, dtype=np.uint64, count=padded * 2)
        first = first.reshape(chunks, 1, chunk, 2)
        self.first_lo, self.first_hi = first[..., 0], first[..., 1]
        # Contiguous copies of the (chunks, 1, chunk) lo and hi words: the broadcasts read
        # each of them 32 times (~15 % faster than reading the interleaved ECB output).
        lohi = s.lohi[: 2 * padded].reshape(2, chunks, 1, chunk)
        self.lo, self.hi = lohi[0], lohi[1]
        self.planes = s.planes[: padded * blocks * 2].reshape(chunks, 2, blocks, chunk)
        self.plo = self.planes[:, 0, :span]  # (chunks, span, chunk)
        self.phi = self.planes[:, 1, :span]
        self.over = s.over[: padded * span].reshape(chunks, span, chunk)
        self.red = s.red[: padded * span].reshape(chunks, span, chunk)
        tweaks = s.tweaks[: padded * blocks * 2].reshape(chunks, chunk, blocks, 2)
        self.tweak_lo, self.tweak_hi = tweaks[..., 0], tweaks[..., 1]
        self.plane_lo = self.planes[:, 0].transpose(0, 2, 1)
        self.plane_hi = self.planes[:, 1].transpose(0, 2, 1)
        words = sectors * blocks * 2
        self.words = words
        self.tweaks = s.tweaks[:words]
        self.mixed = np.frombuffer(s.mixed, dtype=np.uint64, count=words)
        self.mixed_bytes = memoryview(s.mixed)[: words * 8]
        self.ecb = np.frombuffer(s.ecb, dtype=np.uint64, count=words)


class XtsCipher:
    """AES-XTS with one data unit per sector; ``iv_step`` sector IVs per sector."""

    data_path = "numpy"
    kernel_name = "numpy"

    def __init__(
        self, key: bytes, sector_size: int = 512, iv_step: int = 1, *, native: bool = True
    ) -> None:
        if len(key) not in (32, 64):
            raise ValueError("XTS needs a 256- or 512-bit key (two AES-128 or AES-256 keys)")
        if sector_size % BLOCK or sector_size < 2 * BLOCK or sector_size & (sector_size - 1):
            raise ValueError(f"unsupported sector size {sector_size}")
        if sector_size // BLOCK > SPAN and sector_size // BLOCK % SPAN:
            raise ValueError(f"unsupported sector size {sector_size}")
        half = len(key) // 2
        self.sector_size = sector_size
        self.iv_step = iv_step
        self.blocks = sector_size // BLOCK
        self.span = min(self.blocks, SPAN)
        self._data_key = bytes(key[:half])
        self._tweak_key = bytes(key[half:])
        shifts = np.arange(self.span, dtype=np.uint64).reshape(1, self.span, 1)
        self._shift = shifts
        self._shift_back = np.uint64(64) - shifts  # numpy shifts by 64 give 0, as needed
        self._pool: list[_Scratch] = []
        self._lock = threading.Lock()
        self._steps = np.empty(0, dtype=np.uint64)
        self._native_max = NATIVE_SECTORS if sector_size < 4096 else 1 << 30
        self._native = (
            self._checked_native(key, NATIVE_SECTORS if sector_size < 4096 else 256)
            if native
            else None
        )

    def _checked_native(self, key: bytes, capacity: int) -> NativeXts | None:
        """libcrypto's XTS if present and it agrees with cryptography's on a test sector."""
        native = NativeXts.create(key, self.sector_size, self.iv_step, capacity)
        if native is None:
            return None
        sample = (bytes(range(256)) * (self.sector_size // 256 + 1))[: self.sector_size]
        iv = 0x0123456789ABCDEF
        try:
            mode = modes.XTS((iv * self.iv_step % (1 << 64)).to_bytes(16, "little"))
            expected = Cipher(algorithms.AES(key), mode).encryptor().update(sample)
        except ValueError:  # cryptography refuses this key (e.g. equal halves): no check
            return None
        out = bytearray(self.sector_size)
        native.apply(True, sample, out, 1, iv * self.iv_step)
        return native if bytes(out) == expected else None

    @property
    def uses_libcrypto(self) -> bool:
        """Whether small requests go to libcrypto's XTS (else numpy for every size)."""
        return self._native is not None

    # ---- scratch ---------------------------------------------------------------------------
    def _scratch(self, sectors: int) -> _Scratch:
        with self._lock:
            if len(self._steps) < sectors:
                size = max(sectors, 8)
                self._steps = np.arange(size, dtype=np.uint64) * np.uint64(self.iv_step)
            for i, s in enumerate(self._pool):
                if s.capacity >= sectors:
                    return self._pool.pop(i)
        return _Scratch(max(sectors, 8), self.blocks, self._data_key, self._tweak_key)

    def _release(self, s: _Scratch) -> None:
        with self._lock:
            if len(self._pool) < POOL:
                self._pool.append(s)

    # ---- tweaks ----------------------------------------------------------------------------
    def _fill_tweaks(self, s: _Scratch, v: _Views, first_iv: int) -> None:
        """Tweaks of the request in data order, in ``s.tweaks`` (``v.tweaks`` used)."""
        np.add(self._steps[: len(v.iv_column)], np.uint64(first_iv % (1 << 64)), out=v.iv_column)
        s.tweak_enc.update_into(v.iv_bytes, s.first)
        lo, hi, plo, phi, over, red = v.lo, v.hi, v.plo, v.phi, v.over, v.red
        np.copyto(lo, v.first_lo)
        np.copyto(hi, v.first_hi)
        # lo_s = (lo << s) ^ R(hi >> (64 - s)); plo is scratch until its final value
        np.right_shift(hi, self._shift_back, out=over)
        _reduce(over, red, plo)
        np.left_shift(lo, self._shift, out=plo)
        np.bitwise_xor(plo, red, out=plo)
        # hi_s = (hi << s) | (lo >> (64 - s))
        np.left_shift(hi, self._shift, out=phi)
        np.right_shift(lo, self._shift_back, out=over)
        np.bitwise_or(phi, over, out=phi)
        for start in range(self.span, self.blocks, self.span):
            self._times_alpha_span(v.planes, start, s)
        np.copyto(v.tweak_lo, v.plane_lo)
        np.copyto(v.tweak_hi, v.plane_hi)

    def _times_alpha_span(self, planes: U64, start: int, s: _Scratch) -> None:
        """Blocks [start, start+SPAN) = blocks [start-SPAN, start) * alpha^SPAN."""
        chunks, _, _, chunk = planes.shape
        k = np.uint64(SPAN)
        back = np.uint64(64 - SPAN)
        slo, shi = planes[:, 0, start - SPAN : start], planes[:, 1, start - SPAN : start]
        dlo, dhi = planes[:, 0, start : start + SPAN], planes[:, 1, start : start + SPAN]
        over = s.over[: chunks * SPAN * chunk].reshape(chunks, SPAN, chunk)
        red = s.red[: chunks * SPAN * chunk].reshape(chunks, SPAN, chunk)
        np.right_shift(shi, back, out=over)
        _reduce(over, red, dlo)
        np.left_shift(slo, k, out=dlo)
        np.bitwise_xor(dlo, red, out=dlo)
        np.left_shift(shi, k, out=dhi)
        np.right_shift(slo, back, out=over)
        np.bitwise_or(dhi, over, out=dhi)

    # ---- the cipher ------------------------------------------------------------------------
    def _apply(self, encrypt: bool, src: Any, dst: Any, first_iv: int) -> None:
        length = len(src) if not isinstance(src, memoryview) else src.nbytes
        if length % self.sector_size:
            raise ValueError(f"length {length} is not a multiple of {self.sector_size}")
        if length == 0:
            return
        sectors = length // self.sector_size
        if self._native is not None and sectors <= self._native_max:
            self._apply_native(encrypt, src, dst, sectors, first_iv)
        elif length <= MAX_BYTES:
            self._apply_numpy(encrypt, src, dst, sectors, first_iv)
        else:  # bound the scratch memory: ~5 bytes of scratch per byte of request
            piece = MAX_BYTES // self.sector_size
            for done in range(0, sectors, piece):
                n = min(piece, sectors - done)
                a, b = done * self.sector_size, (done + n) * self.sector_size
                iv = (first_iv + done * self.iv_step) & IV_MASK  # plain64 wraps mod 2^64
                self._apply_numpy(encrypt, _slice(src, a, b), _slice(dst, a, b), n, iv)

    def _apply_native(self, encrypt: bool, src: Any, dst: Any, sectors: int, first_iv: int) -> None:
        assert self._native is not None
        step = self._native.capacity
        if sectors <= step:
            self._native.apply(encrypt, src, dst, sectors, first_iv)
            return
        for done in range(0, sectors, step):
            n = min(step, sectors - done)
            a, b = done * self.sector_size, (done + n) * self.sector_size
            iv = (first_iv + done * self.iv_step) & IV_MASK  # plain64 wraps mod 2^64
            self._native.apply(encrypt, _slice(src, a, b), _slice(dst, a, b), n, iv)

    def _apply_numpy(self, encrypt: bool, src: Any, dst: Any, sectors: int, first_iv: int) -> None:
        chunks, chunk = _chunking(sectors)
        s = self._scratch(chunks * chunk)
        try:
            v = s.views_for(chunks, chunk, sectors, self.blocks, self.span)
            self._fill_tweaks(s, v, first_iv)
            words = v.words
            np.bitwise_xor(np.frombuffer(src, dtype=np.uint64, count=words), v.tweaks, out=v.mixed)
            (s.enc if encrypt else s.dec).update_into(v.mixed_bytes, s.ecb)
            out = np.frombuffer(dst, dtype=np.uint64, count=words)
            np.bitwise_xor(v.ecb, v.tweaks, out=out)
        finally:
            self._release(s)

    def encrypt(self, src: Any, dst: Any, first_iv: int) -> None:
        """Encrypt ``src`` (whole sectors) into ``dst`` (may be the same writable buffer)."""
        self._apply(True, src, dst, first_iv)

    def decrypt(self, src: Any, dst: Any, first_iv: int) -> None:
        """Decrypt ``src`` (whole sectors) into ``dst`` (may be the same writable buffer)."""
        self._apply(False, src, dst, first_iv)
