"""The LUKS anti-forensic splitter (AF-split / AF-merge), as in the LUKS1 specification.

A key is stretched into ``stripes`` blocks so that destroying any part of the stored key
material destroys the key. ``diffuse`` hashes the buffer in digest-sized pieces, each prefixed
by its big-endian 32-bit index; a final short piece is hashed and truncated.
"""

from __future__ import annotations

import hashlib
import os


def _diffuse(block: bytearray, hash_name: str) -> None:
    digest_size = hashlib.new(hash_name).digest_size
    for index, start in enumerate(range(0, len(block), digest_size)):
        piece = block[start : start + digest_size]
        h = hashlib.new(hash_name, index.to_bytes(4, "big"))
        h.update(piece)
        block[start : start + len(piece)] = h.digest()[: len(piece)]


def _xor_into(acc: bytearray, other: bytes | bytearray | memoryview) -> None:
    value = int.from_bytes(acc, "little") ^ int.from_bytes(other, "little")
    acc[:] = value.to_bytes(len(acc), "little")


def merge(
    material: bytes | bytearray | memoryview, key_bytes: int, stripes: int, hash_name: str
) -> bytearray:
    """Recover the key from ``stripes`` blocks of ``key_bytes`` bytes."""
    if len(material) < key_bytes * stripes:
        raise ValueError("key material shorter than key_bytes * stripes")
    view = memoryview(material)
    acc = bytearray(key_bytes)
    for i in range(stripes - 1):
        _xor_into(acc, view[i * key_bytes : (i + 1) * key_bytes])
        _diffuse(acc, hash_name)
    _xor_into(acc, view[(stripes - 1) * key_bytes : stripes * key_bytes])
    return acc


def split(key: bytes | bytearray, stripes: int, hash_name: str) -> bytearray:
    """Spread ``key`` over ``stripes`` blocks: random ones, then one that completes the merge."""
    key_bytes = len(key)
    out = bytearray(os.urandom(key_bytes * (stripes - 1))) + bytearray(key_bytes)
    acc = bytearray(key_bytes)
    view = memoryview(out)
    for i in range(stripes - 1):
        _xor_into(acc, view[i * key_bytes : (i + 1) * key_bytes])
        _diffuse(acc, hash_name)
    _xor_into(acc, key)
    out[(stripes - 1) * key_bytes :] = acc
    return out
