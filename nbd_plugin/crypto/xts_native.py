"""AES-XTS (plain64) with the numba kernels: one GIL-free native call per request.

Two kernels, chosen per cipher (i.e. per image) by its sector size and key
(``jit_cipher.xts_kernel_for``):

- ``openssl-xts`` (sectors of ``jit_cipher.SECTOR_KERNEL_FROM`` bytes and more, i.e. every
  LUKS sector size): OpenSSL's own AES-XTS once per sector from the kernel
  (``kernels._xts_sectors``), on XTS contexts keyed once per context set. A sector costs
  ~0.2 us of set-up; from 1024-byte sectors on it is clearly faster, at 512 as fast or
  slightly faster (docs/performance.md).
- ``aes-ecb``: the tweaks computed in the kernel, the data through AES-ECB
  (``kernels._xts``): sectors below that size (IEEE 1619's 32-byte units) and keys whose
  halves are equal, which OpenSSL's XTS refuses to encrypt with (IEEE 1619's vector 1).
"""

from __future__ import annotations

from nbd_plugin.crypto import kernels
from nbd_plugin.crypto.jit_cipher import XTS_KERNELS, ContextSet, JitCipher, xts_kernel_for
from nbd_plugin.crypto.layout import CTX_A, CTX_B
from nbd_plugin.crypto.libcrypto import XtsContext


def _openssl_takes(key: bytes) -> bool:
    """Whether OpenSSL's XTS accepts this key in both directions."""
    try:
        XtsContext(key, True)
        XtsContext(key, False)
    except ValueError:
        return False
    return True


class JitXts(JitCipher):
    """AES-XTS with one data unit per sector; ``iv_step`` sector IVs per sector.

    ``kernel`` forces "openssl-xts" or "aes-ecb" (tests, measurements); None chooses.
    """

    def __init__(
        self, key: bytes, sector_size: int = 512, iv_step: int = 1, kernel: str | None = None
    ) -> None:
        if len(key) not in (32, 64):
            raise ValueError("XTS needs a 256- or 512-bit key (two AES-128 or AES-256 keys)")
        if sector_size & (sector_size - 1):
            raise ValueError(f"unsupported sector size {sector_size}")
        if kernel is not None and kernel not in XTS_KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(XTS_KERNELS)}")
        half = len(key) // 2
        self._key = bytes(key)
        self._data_key, self._tweak_key = bytes(key[:half]), bytes(key[half:])
        chosen = kernel or xts_kernel_for(sector_size)
        if chosen == "openssl-xts" and kernel is None and not _openssl_takes(self._key):
            chosen = "aes-ecb"
        self.kernel_name = chosen
        if chosen == "openssl-xts":
            super().__init__(sector_size, iv_step, kernels.xts_sectors_kernel(), 2)
        else:
            super().__init__(
                sector_size, iv_step, kernels.xts_kernel(), self.chunk_scratch(sector_size)
            )
        self._pool.append(ContextSet(self, self._scratch_words))  # fail now, not later

    def keyed(self, c: ContextSet) -> None:
        for encrypt, state in ((False, c.state[0]), (True, c.state[1])):
            if self.kernel_name == "openssl-xts":
                state[CTX_A] = c.xts(self._key, encrypt)
            else:
                state[CTX_A] = c.ecb(self._tweak_key, True)
                state[CTX_B] = c.ecb(self._data_key, encrypt)
