"""Helpers for the LUKS2 tests: real cryptsetup, and an independent straightforward XTS.

Nothing here uses nbd_plugin: the checks must not share code with what they check.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# Fast KDF settings for tests (cryptsetup and ours).
ARGON = (
    "--pbkdf",
    "argon2id",
    "--pbkdf-memory",
    "32768",
    "--pbkdf-parallel",
    "1",
    "--pbkdf-force-iterations",
    "4",
)
PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
OUR_ARGON = {"pbkdf": "argon2id", "pbkdf_time": 4, "pbkdf_memory": 32768, "pbkdf_parallel": 1}
OUR_PBKDF2 = {"pbkdf": "pbkdf2", "iterations": 1000}
DATA_OFFSET = 16 << 20


def cs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["cryptsetup", *args], capture_output=True, text=True, timeout=120, check=check
    )


def luks2_format(image: Path, keyfile: Path, size: int, *opts: str) -> None:
    """cryptsetup luksFormat --type luks2 on a file with ``size`` payload bytes."""
    with image.open("wb") as f:
        f.truncate(DATA_OFFSET + size)
    cs(
        "luksFormat",
        "--type",
        "luks2",
        "--batch-mode",
        "--key-file",
        str(keyfile),
        *opts,
        str(image),
    )


def opens(image: Path, keyfile: Path) -> bool:
    r = cs("open", "--test-passphrase", "--key-file", str(keyfile), str(image), check=False)
    return r.returncode == 0


def volume_key(image: Path, keyfile: Path) -> bytes:
    """The volume key as ``cryptsetup luksDump --dump-volume-key`` reveals it."""
    out = cs(
        "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", str(keyfile), str(image)
    ).stdout
    text = out.split("MK dump:", 1)[1]
    hexdigits = "".join(re.findall(r"\b[0-9a-f]{2}\b", text))
    return bytes.fromhex(hexdigits)


def metadata(image: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(cs("luksDump", "--dump-json-metadata", str(image)).stdout)
    return doc


def xts_decrypt(
    key: bytes, data: bytes, sector: int, first_sector: int, iv_tweak: int = 0
) -> bytes:
    """Per-sector AES-XTS, IV = iv_tweak + (sector number in 512-byte units) mod 2^64."""
    out = bytearray()
    per = sector // 512
    for i in range(len(data) // sector):
        iv = (iv_tweak + (first_sector + i) * per) % (1 << 64)  # plain64 wraps, as in dm-crypt
        dec = Cipher(algorithms.AES(key), modes.XTS(iv.to_bytes(16, "little"))).decryptor()
        out += dec.update(data[i * sector : (i + 1) * sector]) + dec.finalize()
    return bytes(out)


def payload(image: Path, offset: int, length: int) -> bytes:
    with image.open("rb") as f:
        f.seek(DATA_OFFSET + offset)
        return f.read(length)


def digest(image: Path) -> str:
    return hashlib.sha256(image.read_bytes()).hexdigest()


def rewrite_json(image: Path, edit: Any, copies: tuple[int, ...] = (0, 16384)) -> None:
    """Edit the JSON of the header copies at ``copies`` and fix their checksums (sha256)."""

    def as_doc(text: str) -> str:
        doc = json.loads(text)
        edit(doc)
        return json.dumps(doc)

    rewrite_json_text(image, as_doc, copies)


def rewrite_json_text(image: Path, edit: Any, copies: tuple[int, ...] = (0, 16384)) -> None:
    """Replace the JSON text of the header copies by ``edit(text)``; fix their checksums."""
    with image.open("r+b") as f:
        for offset in copies:
            f.seek(offset)
            raw = bytearray(f.read(16384))
            text = edit(raw[4096:].split(b"\0", 1)[0].decode()).encode()
            raw[4096:] = text.ljust(16384 - 4096, b"\0")[: 16384 - 4096]
            raw[448:512] = bytes(64)
            raw[448:480] = hashlib.sha256(raw).digest()
            f.seek(offset)
            f.write(raw)


def set_json_path(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit setting the dotted ``path`` of the LUKS2 JSON to ``value``."""
    *parents, last = path.split(".")

    def edit(doc: dict[str, Any]) -> None:
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value

    return edit
