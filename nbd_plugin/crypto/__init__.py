"""Sector ciphers (``make_cipher``, ``check_supported``) and key derivation (``pbkdf2``,
``argon2``) for LUKS: no LUKS headers, and no file I/O but the numba kernels' pread/pwrite on
a descriptor their caller owns (``kernels``). Its modules: docs/architecture.md.
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
