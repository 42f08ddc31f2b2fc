"""AES-XTS (plain64) with the numba kernels: one GIL-free native call per request.

Three kernels, chosen per cipher (i.e. per image) by the CPU, the sector size and the key
(``jit_cipher.xts_kernel_for``):

- ``vaes-xts`` (a CPU with VAES and AVX-512, sectors of a multiple of 256 bytes: every LUKS
  sector size): the whole request on the vector AES instructions, compiled from LLVM IR by
  numba (``vaes``); no libcrypto call. 11-12 GB/s per core here, twice OpenSSL 3.0's XTS.
- ``openssl-xts`` (otherwise, sectors of ``jit_cipher.SECTOR_KERNEL_FROM`` bytes and more):
  OpenSSL's own AES-XTS once per sector from the kernel (``kernels._xts_sectors``), on XTS
  contexts keyed once per context set. A sector costs ~0.1-0.2 us of set-up.
- ``aes-ecb``: the tweaks computed in the kernel, the data through AES-ECB
  (``kernels._xts``): units below 512 bytes (IEEE 1619's 32-byte vectors) and, without
  VAES, keys whose halves are equal, which OpenSSL's XTS refuses to encrypt with (IEEE
  1619's vector 1).
"""

from __future__ import annotations

from nbd_plugin.crypto import kernels, vaes
from nbd_plugin.crypto.jit_cipher import XTS_KERNELS, ContextSet, JitCipher, xts_kernel_for
from nbd_plugin.crypto.layout import CTX_A, CTX_B, HEAD, ROUNDS
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

    ``kernel`` forces one of ``XTS_KERNELS`` (tests, measurements); None chooses.
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
        if chosen == "vaes-xts":
            problem = vaes.unavailable()
            if problem is not None:
                raise OSError(f"the VAES kernel cannot run here: {problem}")
            if sector_size % vaes.STEP_BYTES:
                raise ValueError(f"the VAES kernel needs sectors of a multiple of "
                                 f"{vaes.STEP_BYTES} bytes, not {sector_size}")  # fmt: skip
            words = vaes.DATA_KEY_WORDS + vaes.TWEAK_KEY_WORDS
            super().__init__(
                sector_size, iv_step, kernels.xts_vaes_kernel(), words, shared_reads=True
            )
        elif chosen == "openssl-xts":
            super().__init__(sector_size, iv_step, kernels.xts_sectors_kernel(), 2)
        else:
            super().__init__(
                sector_size, iv_step, kernels.xts_kernel(), self.chunk_scratch(sector_size)
            )
        self._ready()

    def keyed(self, c: ContextSet) -> None:
        for encrypt, state in ((False, c.state[0]), (True, c.state[1])):
            if self.kernel_name == "vaes-xts":
                state[ROUNDS] = vaes.fill_state(state, HEAD, self._key, encrypt)
            elif self.kernel_name == "openssl-xts":
                state[CTX_A] = c.xts(self._key, encrypt)
            else:
                state[CTX_A] = c.ecb(self._tweak_key, True)
                state[CTX_B] = c.ecb(self._data_key, encrypt)
