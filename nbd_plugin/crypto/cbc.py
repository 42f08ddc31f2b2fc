"""AES-CBC sector ciphers: cbc-plain64, cbc-plain and cbc-essiv:HASH (dm-crypt semantics).

This is the reference (numpy) path; ``cbc_native`` runs both directions in numba kernels.
Decryption is vectorised: one ECB pass over the whole request, then each block is xored with
the previous ciphertext block (the sector IV for a sector's first block). Encryption is
inherently sequential inside a sector, so it runs one CBC context per sector: correct, slower
than XTS, and only used for images libvirt or old tools made. New images use XTS.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16


def essiv_salt(key: bytes, iv_mode: str) -> bytes | None:
    """The ESSIV key HASH(key) for "essiv:HASH", None for "plain64"/"plain"; ValueError else."""
    if iv_mode in ("plain64", "plain"):
        return None
    if not iv_mode.startswith("essiv:"):
        raise ValueError(f"unknown IV mode {iv_mode!r}")
    hash_name = iv_mode.split(":", 1)[1]
    try:
        salt = hashlib.new(hash_name, key).digest()
    except ValueError as exc:
        raise ValueError(f"unknown ESSIV hash {hash_name!r}") from exc
    if len(salt) not in (16, 24, 32):
        raise ValueError(f"ESSIV hash {hash_name!r} gives no AES key ({len(salt)} bytes)")
    return salt


class CbcCipher:
    """AES-CBC, one chain per sector. ``iv_mode`` is "plain64", "plain" or "essiv:<hash>"."""

    data_path = "numpy"
    kernel_name = "numpy"

    def __init__(self, key: bytes, iv_mode: str, sector_size: int = 512, iv_step: int = 1) -> None:
        if len(key) not in (16, 24, 32):
            raise ValueError("AES-CBC needs a 128-, 192- or 256-bit key")
        self.sector_size = sector_size
        self.iv_step = iv_step
        self._key = bytes(key)
        self._aes = algorithms.AES(self._key)
        self._wrap32 = iv_mode == "plain"
        salt = essiv_salt(self._key, iv_mode)
        self._essiv = None if salt is None else algorithms.AES(salt)

    def _ivs(self, first_iv: int, sectors: int) -> bytes:
        numbers = np.zeros((sectors, 2), dtype=np.uint64)
        numbers[:, 0] = np.arange(sectors, dtype=np.uint64) * self.iv_step + first_iv
        if self._wrap32:
            numbers[:, 0] &= np.uint64(0xFFFFFFFF)
        raw = numbers.tobytes()
        if self._essiv is None:
            return raw
        # Contexts per call: cryptography's must not be shared by threads (PARALLEL).
        return Cipher(self._essiv, modes.ECB()).encryptor().update(raw)

    def _check(self, length: int) -> int:
        if length % self.sector_size:
            raise ValueError(f"length {length} is not a multiple of {self.sector_size}")
        return length // self.sector_size

    def decrypt(self, src: Any, dst: Any, first_iv: int) -> None:
        """Decrypt whole sectors of ``src`` into ``dst`` (may be the same buffer)."""
        sectors = self._check(len(src))
        if not sectors:
            return
        blocks = self.sector_size // BLOCK
        cipher = np.frombuffer(bytes(src), dtype=np.uint8).reshape(sectors, blocks, BLOCK)
        plain = np.frombuffer(
            Cipher(self._aes, modes.ECB()).decryptor().update(cipher.tobytes()), dtype=np.uint8
        )
        plain = plain.reshape(sectors, blocks, BLOCK).copy()
        chain = np.empty_like(cipher)
        chain[:, 0] = np.frombuffer(self._ivs(first_iv, sectors), dtype=np.uint8).reshape(
            sectors, BLOCK
        )
        chain[:, 1:] = cipher[:, :-1]
        np.bitwise_xor(plain, chain, out=plain)
        np.frombuffer(dst, dtype=np.uint8, count=len(src))[:] = plain.reshape(-1)

    def encrypt(self, src: Any, dst: Any, first_iv: int) -> None:
        """Encrypt whole sectors of ``src`` into ``dst`` (may be the same buffer)."""
        sectors = self._check(len(src))
        ivs = self._ivs(first_iv, sectors)
        data = bytes(src)
        out = memoryview(dst)
        size = self.sector_size
        for j in range(sectors):
            enc = Cipher(self._aes, modes.CBC(ivs[j * BLOCK : (j + 1) * BLOCK])).encryptor()
            out[j * size : (j + 1) * size] = enc.update(data[j * size : (j + 1) * size])
