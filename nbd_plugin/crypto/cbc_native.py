"""AES-CBC sector ciphers (plain64, plain, essiv:HASH) with the numba kernels.

Decryption is one ECB call per chunk and XORs; encryption, sequential inside a sector, runs
block column by block column over the chunk's sectors (``kernels._cbc``). IVs follow
dm-crypt, as ``cbc.CbcCipher`` (the reference path) does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nbd_plugin.crypto import kernels
from nbd_plugin.crypto.cbc import essiv_salt
from nbd_plugin.crypto.jit_cipher import MASK64, ContextSet, JitCipher


class JitCbc(JitCipher):
    """AES-CBC, one chain per sector. ``iv_mode`` is "plain64", "plain" or "essiv:<hash>"."""

    def __init__(self, key: bytes, iv_mode: str, sector_size: int = 512, iv_step: int = 1) -> None:
        if len(key) not in (16, 24, 32):
            raise ValueError("AES-CBC needs a 128-, 192- or 256-bit key")
        kernel = kernels.cbc_kernel()
        super().__init__(sector_size, iv_step, (kernel, kernel))
        self._key = bytes(key)
        self._salt = essiv_salt(self._key, iv_mode)
        mask = np.uint64(0xFFFFFFFF if iv_mode == "plain" else MASK64)
        self._tails = ((mask, 0), (mask, 1))
        self._pool.append(self._contexts())  # fail now, not on the first request

    def _heads(self, c: ContextSet) -> tuple[Any, Any]:
        iv = c.ecb(self._salt, True) if self._salt is not None else np.uint64(0)
        return (iv, c.ecb(self._key, False)), (iv, c.ecb(self._key, True))
