"""The LUKS anti-forensic splitter (AF-split / AF-merge), as in the LUKS1 specification.

A key is stretched into ``stripes`` blocks so that destroying any part of the stored key
material destroys the key. ``diffuse`` hashes the buffer in digest-sized pieces, each prefixed
by its big-endian 32-bit index; a final short piece is hashed and truncated.

Every unlock attempt merges 4000 stripes, so the loop is kept to a few C calls per stripe:
the index-prefixed hashers are built once and copied, the XOR is one big-integer operation.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any


class _Diffuser:
    """``diffuse`` for one hash and one key size, with its per-piece hashers made once."""

    def __init__(self, hash_name: str, key_bytes: int) -> None:
        digest_size = hashlib.new(hash_name).digest_size
        self.size = key_bytes
        self.pieces = [
            (
                start,
                min(start + digest_size, key_bytes),
                hashlib.new(hash_name, i.to_bytes(4, "big")),
            )
            for i, start in enumerate(range(0, key_bytes, digest_size))
        ]

    def __call__(self, block: bytes) -> bytes:
        out = []
        for start, end, prefix in self.pieces:
            h: Any = prefix.copy()
            h.update(block[start:end])
            out.append(h.digest()[: end - start])
        return b"".join(out)


def _stripes(material: bytes | bytearray | memoryview, key_bytes: int, stripes: int) -> list[int]:
    view = memoryview(material)
    return [
        int.from_bytes(view[i * key_bytes : (i + 1) * key_bytes], "little") for i in range(stripes)
    ]


def merge(
    material: bytes | bytearray | memoryview, key_bytes: int, stripes: int, hash_name: str
) -> bytearray:
    """Recover the key from ``stripes`` blocks of ``key_bytes`` bytes."""
    if len(material) < key_bytes * stripes:
        raise ValueError("key material shorter than key_bytes * stripes")
    diffuse = _Diffuser(hash_name, key_bytes)
    blocks = _stripes(material, key_bytes, stripes)
    acc = bytes(key_bytes)
    if len(diffuse.pieces) == 1:  # the key fits one digest (aes-xts-256 with sha256): inline
        _, end, prefix = diffuse.pieces[0]
        for value in blocks[:-1]:
            h: Any = prefix.copy()
            h.update((int.from_bytes(acc, "little") ^ value).to_bytes(key_bytes, "little"))
            acc = h.digest()[:end]
    else:
        for value in blocks[:-1]:
            acc = diffuse((int.from_bytes(acc, "little") ^ value).to_bytes(key_bytes, "little"))
    return bytearray((int.from_bytes(acc, "little") ^ blocks[-1]).to_bytes(key_bytes, "little"))


def split(key: bytes | bytearray, stripes: int, hash_name: str) -> bytearray:
    """Spread ``key`` over ``stripes`` blocks: random ones, then one that completes the merge."""
    key_bytes = len(key)
    diffuse = _Diffuser(hash_name, key_bytes)
    out = bytearray(os.urandom(key_bytes * (stripes - 1)))
    acc = bytes(key_bytes)
    for value in _stripes(out, key_bytes, stripes - 1):
        acc = diffuse((int.from_bytes(acc, "little") ^ value).to_bytes(key_bytes, "little"))
    last = int.from_bytes(acc, "little") ^ int.from_bytes(key, "little")
    out += last.to_bytes(key_bytes, "little")
    return out
