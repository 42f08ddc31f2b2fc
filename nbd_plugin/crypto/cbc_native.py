"""AES-CBC sector ciphers (plain64, plain, essiv:HASH) with the numba kernels.

Decryption is one ECB call per chunk and XORs; encryption, sequential inside a sector, runs
block column by block column over the chunk's sectors (``kernels._cbc``). IVs follow
dm-crypt, as ``cbc.CbcCipher`` (the reference path) does.
"""

from __future__ import annotations

from nbd_plugin.crypto import kernels
from nbd_plugin.crypto.cbc import essiv_salt
from nbd_plugin.crypto.jit_cipher import ContextSet, JitCipher
from nbd_plugin.crypto.layout import CTX_A, CTX_B


class JitCbc(JitCipher):
    """AES-CBC, one chain per sector. ``iv_mode`` is "plain64", "plain" or "essiv:<hash>"."""

    kernel_name = "aes-ecb"

    def __init__(self, key: bytes, iv_mode: str, sector_size: int = 512, iv_step: int = 1) -> None:
        if len(key) not in (16, 24, 32):
            raise ValueError("AES-CBC needs a 128-, 192- or 256-bit key")
        super().__init__(
            sector_size, iv_step, kernels.cbc_kernel(), self.chunk_scratch(sector_size)
        )
        if iv_mode == "plain":
            self._iv_mask = 0xFFFFFFFF
        self._key = bytes(key)
        self._salt = essiv_salt(self._key, iv_mode)
        self._ready()

    def keyed(self, c: ContextSet) -> None:
        for encrypt, state in ((False, c.state[0]), (True, c.state[1])):
            if self._salt is not None:
                state[CTX_A] = c.ecb(self._salt, True)
            state[CTX_B] = c.ecb(self._key, encrypt)
