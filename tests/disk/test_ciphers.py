"""The cipher registry and the CBC modes, against straightforward per-sector references."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbd_plugin.crypto.cbc import CbcCipher
from nbd_plugin.crypto.cbc_native import JitCbc
from nbd_plugin.crypto.jit_cipher import CHUNK_BYTES
from nbd_plugin.crypto.registry import make_cipher, supported
from nbd_plugin.errors import UnsupportedError


def reference_cbc(key: bytes, data: bytes, first: int, iv_mode: str, size: int = 512) -> bytes:
    out = []
    for j in range(len(data) // size):
        n = first + j
        if iv_mode == "plain":
            n &= 0xFFFFFFFF
        iv = n.to_bytes(16, "little")
        if iv_mode.startswith("essiv"):
            salt = hashlib.sha256(key).digest()
            iv = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(iv)
        enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        out.append(enc.update(data[j * size : (j + 1) * size]))
    return b"".join(out)


def cbc(path: str, key: bytes, iv_mode: str, size: int = 512, step: int = 1) -> Any:
    if path == "numba":
        return JitCbc(key, iv_mode, size, step)
    return CbcCipher(key, iv_mode, size, step)


CHUNK = CHUNK_BYTES // 512


@pytest.mark.parametrize("path", ["numba", "numpy"])
@pytest.mark.parametrize("iv_mode", ["plain64", "plain", "essiv:sha256"])
@pytest.mark.parametrize("key_bytes", [16, 24, 32])
@pytest.mark.parametrize("sectors", [1, 7, CHUNK, CHUNK + 3])
def test_cbc_matches_reference(path: str, iv_mode: str, key_bytes: int, sectors: int) -> None:
    key = os.urandom(key_bytes)
    data = os.urandom(512 * sectors)
    first = (1 << 32) - 3  # crosses the 32-bit wrap of "plain"
    cipher = cbc(path, key, iv_mode)
    out = bytearray(len(data))
    cipher.encrypt(data, out, first)
    assert bytes(out) == reference_cbc(key, data, first, iv_mode)
    back = bytearray(len(data))
    cipher.decrypt(bytes(out), back, first)  # out of place, from a read-only buffer
    assert bytes(back) == data
    cipher.decrypt(out, out, first)  # in place
    assert bytes(out) == data


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_cbc_4096_byte_sectors_and_64_bit_wrap(path: str) -> None:
    key = os.urandom(32)
    data = os.urandom(4096 * 11)
    first = (1 << 64) - 8 * 5
    cipher = cbc(path, key, "plain64", 4096, 8)
    out = bytearray(len(data))
    cipher.encrypt(data, out, first)
    want = b"".join(
        Cipher(algorithms.AES(key), modes.CBC(((first + 8 * j) % (1 << 64)).to_bytes(16, "little")))
        .encryptor()
        .update(data[4096 * j : 4096 * (j + 1)])
        for j in range(11)
    )
    assert bytes(out) == want
    cipher.decrypt(out, out, first)
    assert bytes(out) == data


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_cbc_refuses_essiv_hashes_that_give_no_aes_key(path: str) -> None:
    with pytest.raises(ValueError, match="sha1"):
        cbc(path, os.urandom(32), "essiv:sha1")


def test_xts_is_registered_and_matches_openssl() -> None:
    key = os.urandom(64)
    data = os.urandom(512 * 3)
    out = bytearray(len(data))
    make_cipher("aes", "xts-plain64", key).encrypt(data, out, 10)
    expected = b"".join(
        Cipher(algorithms.AES(key), modes.XTS((10 + j).to_bytes(16, "little")))
        .encryptor()
        .update(data[j * 512 : (j + 1) * 512])
        for j in range(3)
    )
    assert bytes(out) == expected


@pytest.mark.parametrize(
    ("cipher", "mode", "key_bytes", "message"),
    [
        ("serpent", "xts-plain64", 64, "not supported"),
        ("aes", "ctr-plain64", 32, "not supported"),
        ("aes", "xts-plain64", 48, "384-bit key"),
        ("aes", "cbc-essiv:md77", 32, "md77"),
    ],
)
def test_unsupported_specs_are_refused(
    cipher: str, mode: str, key_bytes: int, message: str
) -> None:
    with pytest.raises(UnsupportedError, match=message):
        make_cipher(cipher, mode, os.urandom(key_bytes))


def test_supported_lists_the_registry() -> None:
    assert {"aes-xts", "aes-cbc"} <= set(supported())
