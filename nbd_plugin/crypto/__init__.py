"""Sector ciphers and key derivation for LUKS: no file I/O, no LUKS headers.

- ``make_cipher(cipher, mode, key, sector_size, iv_step)`` -> a ``SectorCipher`` that
  encrypts/decrypts runs of whole sectors (``registry``; AES-XTS in ``xts`` with the native
  path in ``libcrypto``, AES-CBC with plain64/essiv IVs in ``cbc``). ``check_supported``
  refuses what is not implemented (``UnsupportedError``) before any key is derived.
- ``pbkdf2``: PBKDF2-HMAC (LUKS1, LUKS2 pbkdf2 keyslots and digests) and its calibration.
- ``argon2``: Argon2i/Argon2id (LUKS2 keyslots), its cost limits and calibration.
"""

from nbd_plugin.crypto import argon2, pbkdf2
from nbd_plugin.crypto.registry import (
    SectorCipher,
    check_supported,
    make_cipher,
    register,
    supported,
)

__all__ = [
    "SectorCipher",
    "argon2",
    "check_supported",
    "make_cipher",
    "pbkdf2",
    "register",
    "supported",
]
