"""Sector ciphers (``make_cipher``, ``check_supported``) and key derivation (``pbkdf2``,
``argon2``) for LUKS: no file I/O, no LUKS headers. Its modules: docs/architecture.md.
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
