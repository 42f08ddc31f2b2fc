"""Reproducible random passes: an AES-256-CTR keystream per (erase key, pass number).

Each erase draws one 32-byte key from os.urandom and keeps it in its journal. Pass `n` uses
the key HMAC-SHA256(erase_key, "vmshield-erase-pass" || n) and CTR counter block
`offset // 16`, so the bytes written at any offset depend only on (key, pass, offset): a resumed
erase writes exactly what an uninterrupted one would, and verification can recompute what it
expects to read. AES-CTR output is a CSPRNG keystream; OpenSSL produces it at several GB/s,
where os.urandom per block manages ~0.5 GB/s.

Knowing the erase key only predicts the overwrite pattern; it reveals nothing of the data.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
AES_BLOCK = 16
# cryptography's update_into needs room for one block beyond the data.
SLACK = AES_BLOCK - 1


def pass_key(erase_key: bytes, pass_number: int) -> bytes:
    """The AES-256 key of pass `pass_number` (any int, negative ones serve the header wipe)."""
    if len(erase_key) != KEY_BYTES:
        raise ValueError(f"erase key must be {KEY_BYTES} bytes, not {len(erase_key)}")
    label = b"vmshield-erase-pass" + pass_number.to_bytes(8, "big", signed=True)
    return hmac.new(erase_key, label, hashlib.sha256).digest()


class Keystream:
    """Fills buffers with the keystream of one pass at a given byte offset."""

    def __init__(self, erase_key: bytes, pass_number: int, max_chunk: int) -> None:
        self._algorithm = algorithms.AES(pass_key(erase_key, pass_number))
        # CTR encrypts zeros into the bare keystream; one zero buffer, reused forever.
        self._zeros = bytes(max_chunk + AES_BLOCK)
        self._max = max_chunk

    def fill(self, out: memoryview, offset: int, length: int) -> memoryview:
        """Write `length` keystream bytes for file `offset` into `out`; return the view of them.

        `out` needs `length + 31` bytes of room. The returned view starts at `out[0]` when
        `offset` is 16-aligned (always, for extents of a real filesystem), otherwise a few bytes
        in, which keeps the byte at `offset` identical whatever chunking the caller used.
        """
        if length > self._max:
            raise ValueError(f"chunk of {length} bytes exceeds the keystream's {self._max}")
        skip = offset % AES_BLOCK
        counter = (offset // AES_BLOCK).to_bytes(AES_BLOCK, "big")
        encryptor = Cipher(self._algorithm, modes.CTR(counter)).encryptor()
        need = skip + length
        padded = need + (-need % AES_BLOCK)
        encryptor.update_into(memoryview(self._zeros)[:padded], out[: padded + SLACK])
        return out[skip:need]
