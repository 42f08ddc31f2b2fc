"""AES-XTS over whole requests: a handful of OpenSSL calls per request, never one per sector.

XTS (IEEE 1619) encrypts block i of data unit j as ``E_K1(P xor D) xor D`` with
``D = E_K2(IV_j) * alpha^i`` in GF(2^128). We compute every ``D`` of a request at once:

1. one AES-ECB call under K2 turns all the sector IVs (plain64: the little-endian sector
   number) into the first tweaks ``T_j``;
2. the tweaks of the other blocks are filled by log-doubling: columns ``[k, 2k)`` are columns
   ``[0, k)`` multiplied by ``alpha^k`` (shifts by a constant, so numpy stays on its fast path);
3. data xor tweaks, one AES-ECB call under K1, xor tweaks again.

Ciphertext stealing is not needed: a data unit is a whole sector (512 or 4096 bytes).
All scratch arrays come from a pool and are reused; nbdkit gives each callback a fresh
thread state, so the pool is a plain lock-protected stack, not threading.local.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16
U64 = npt.NDArray[np.uint64]


def _mul_alpha_pow(src: U64, dst: U64, k: int, tmp: U64, over: U64) -> None:
    """dst = src * alpha^k in GF(2^128) for 1 <= k <= 63 (arrays of [..., (lo, hi)] words).

    ``x^128 = x^7 + x^2 + x + 1`` so the k bits shifted out of the top come back as
    ``over * 0x87`` (carry-less), which fits in the low word because k <= 56.
    """
    lo, hi = src[..., 0], src[..., 1]
    dlo, dhi = dst[..., 0], dst[..., 1]
    np.right_shift(hi, 64 - k, out=over)
    np.left_shift(hi, k, out=dhi)
    np.right_shift(lo, 64 - k, out=tmp)
    np.bitwise_or(dhi, tmp, out=dhi)
    np.left_shift(lo, k, out=dlo)
    np.bitwise_xor(dlo, over, out=dlo)
    for shift in (1, 2, 7):
        np.left_shift(over, shift, out=tmp)
        np.bitwise_xor(dlo, tmp, out=dlo)


class _Scratch:
    """Preallocated arrays for one request of up to ``capacity`` sectors."""

    def __init__(self, capacity: int, blocks: int) -> None:
        self.capacity = capacity
        self.index = np.arange(capacity, dtype=np.uint64)
        self.ivs = np.zeros((capacity, 2), dtype=np.uint64)
        self.tweaks = np.empty((capacity, blocks, 2), dtype=np.uint64)
        self.tmp = np.empty((capacity, blocks // 2), dtype=np.uint64)
        self.over = np.empty((capacity, blocks // 2), dtype=np.uint64)
        # cryptography's update_into wants len(out) >= len(data) + 15.
        self.ecb_out = bytearray(capacity * blocks * BLOCK + BLOCK)
        self.tweak_out = bytearray(capacity * BLOCK + BLOCK)


class XtsCipher:
    """AES-XTS with one data unit per sector; ``iv_step`` sector IVs per sector."""

    def __init__(self, key: bytes, sector_size: int = 512, iv_step: int = 1) -> None:
        if len(key) not in (32, 64):
            raise ValueError("XTS needs a 256- or 512-bit key (two AES-128 or AES-256 keys)")
        if sector_size % BLOCK or sector_size < 32 or sector_size & (sector_size - 1):
            raise ValueError(f"unsupported sector size {sector_size}")
        half = len(key) // 2
        self.sector_size = sector_size
        self.iv_step = iv_step
        self.blocks = sector_size // BLOCK
        self._data_key = algorithms.AES(key[:half])
        self._tweak_enc = Cipher(algorithms.AES(key[half:]), modes.ECB()).encryptor()
        self._enc = Cipher(self._data_key, modes.ECB()).encryptor()
        self._dec = Cipher(self._data_key, modes.ECB()).decryptor()
        self._pool: list[_Scratch] = []
        self._lock = threading.Lock()

    def _scratch(self, sectors: int) -> _Scratch:
        with self._lock:
            for i, s in enumerate(self._pool):
                if s.capacity >= sectors:
                    return self._pool.pop(i)
        return _Scratch(max(sectors, 8), self.blocks)

    def _release(self, s: _Scratch) -> None:
        with self._lock:
            if len(self._pool) < 4:
                self._pool.append(s)

    def _fill_tweaks(self, s: _Scratch, sectors: int, first_iv: int) -> U64:
        ivs = s.ivs[:sectors]
        column = ivs[:, 0]
        np.multiply(s.index[:sectors], np.uint64(self.iv_step), out=column)
        np.add(column, np.uint64(first_iv), out=column)
        tweaks = s.tweaks[:sectors]
        first = s.tweak_out
        self._tweak_enc.update_into(memoryview(ivs.reshape(-1).view(np.uint8)), first)
        tweaks[:, 0, :] = np.frombuffer(first, dtype=np.uint64, count=sectors * 2).reshape(
            sectors, 2
        )
        k = 1
        while k < self.blocks:
            n = min(k, self.blocks - k)
            src, dst = tweaks[:, :n], tweaks[:, k : k + n]
            tmp, over = s.tmp[:sectors, :n], s.over[:sectors, :n]
            # The closed form holds for shifts up to 56 bits: go in steps of at most 32.
            step = min(k, 32)
            _mul_alpha_pow(src, dst, step, tmp, over)
            for _ in range(k // step - 1):
                _mul_alpha_pow(dst, dst, step, tmp, over)
            k *= 2
        return tweaks

    def _apply(self, ecb: Any, src: Any, dst: Any, first_iv: int) -> None:
        length = len(src)
        if length % self.sector_size:
            raise ValueError(f"length {length} is not a multiple of {self.sector_size}")
        if length == 0:
            return
        sectors = length // self.sector_size
        s = self._scratch(sectors)
        try:
            tweaks = self._fill_tweaks(s, sectors, first_iv).reshape(-1)
            words = length // 8
            mixed = np.frombuffer(s.ecb_out, dtype=np.uint64, count=words)
            np.bitwise_xor(np.frombuffer(src, dtype=np.uint64, count=words), tweaks, out=mixed)
            view = memoryview(s.ecb_out)
            ecb.update_into(view[:length], s.ecb_out)
            out = np.frombuffer(dst, dtype=np.uint64, count=words)
            np.bitwise_xor(mixed, tweaks, out=out)
        finally:
            self._release(s)

    def encrypt(self, src: Any, dst: Any, first_iv: int) -> None:
        """Encrypt ``src`` (whole sectors) into ``dst`` (may be the same writable buffer)."""
        self._apply(self._enc, src, dst, first_iv)

    def decrypt(self, src: Any, dst: Any, first_iv: int) -> None:
        """Decrypt ``src`` (whole sectors) into ``dst`` (may be the same writable buffer)."""
        self._apply(self._dec, src, dst, first_iv)


Transform = Callable[[Any, Any, int], None]
