"""The cipher registry and the CBC modes, against straightforward per-sector references."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

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


@pytest.mark.parametrize("iv_mode", ["plain64", "plain", "essiv:sha256"])
@pytest.mark.parametrize("key_bytes", [16, 32])
def test_cbc_matches_reference(iv_mode: str, key_bytes: int) -> None:
    key = os.urandom(key_bytes)
    data = os.urandom(512 * 7)
    first = (1 << 32) - 3  # crosses the 32-bit wrap of "plain"
    cipher = make_cipher("aes", f"cbc-{iv_mode}", key)
    out = bytearray(len(data))
    cipher.encrypt(data, out, first)
    assert bytes(out) == reference_cbc(key, data, first, iv_mode)
    back = bytearray(out)
    cipher.decrypt(back, back, first)
    assert bytes(back) == data


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
