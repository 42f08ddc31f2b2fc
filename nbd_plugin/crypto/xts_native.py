"""AES-XTS (plain64) with the numba kernel: one GIL-free native call per request.

The tweak key's ECB context turns sector numbers into tweaks, the data key's ECB contexts
do the data; ``kernels._xts`` does the rest (see there). Equal key halves work too (OpenSSL's
own XTS refuses them; IEEE 1619's vector 1 has them).
"""

from __future__ import annotations

from typing import Any

from nbd_plugin.crypto import kernels
from nbd_plugin.crypto.jit_cipher import ContextSet, JitCipher


class JitXts(JitCipher):
    """AES-XTS with one data unit per sector; ``iv_step`` sector IVs per sector."""

    def __init__(self, key: bytes, sector_size: int = 512, iv_step: int = 1) -> None:
        if len(key) not in (32, 64):
            raise ValueError("XTS needs a 256- or 512-bit key (two AES-128 or AES-256 keys)")
        if sector_size & (sector_size - 1):
            raise ValueError(f"unsupported sector size {sector_size}")
        kernel = kernels.xts_kernel()
        super().__init__(sector_size, iv_step, (kernel, kernel))
        half = len(key) // 2
        self._data_key, self._tweak_key = bytes(key[:half]), bytes(key[half:])
        self._pool.append(self._contexts())  # fail now, not on the first request

    def _heads(self, c: ContextSet) -> tuple[Any, Any]:
        tweak = c.ecb(self._tweak_key, True)
        return (tweak, c.ecb(self._data_key, False)), (tweak, c.ecb(self._data_key, True))
