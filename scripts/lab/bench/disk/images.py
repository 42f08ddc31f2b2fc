"""The images of a bench run: random source data, a plaintext image, LUKS1 images.

Images are sparse when created and filled through NBD (``cli``), never by writing the file.
LUKS images are made by cryptsetup (the reference implementation, neutral to every server).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CHUNK = 4 << 20
PASSPHRASE = b"vmshield-bench-passphrase"
# LUKS1 phdr: magic[6] version u16 cipher[32] mode[32] hash[32] payloadOffset u32 (sectors).
_PAYLOAD_OFFSET = struct.Struct(">I")
_PAYLOAD_OFFSET_AT = 6 + 2 + 32 + 32 + 32


def write_passphrase(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(PASSPHRASE)  # no trailing newline: qemu and nbdkit read it byte for byte


def random_file(path: str, size: int) -> None:
    """``size`` bytes of AES-CTR keystream (incompressible, not all-zero, fast to make)."""
    enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    zeros = bytes(CHUNK)
    out = bytearray(CHUNK + 16)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, CHUNK)
            enc.update_into(zeros[:n], out)
            f.write(memoryview(out)[:n])
            left -= n


def sparse_file(path: str, size: int) -> None:
    with open(path, "xb") as f:
        f.truncate(size)


def luks1_image(path: str, size: int, passphrase_file: str, iterations: int | None) -> None:
    """A LUKS1 aes-xts-plain64 (512-bit key) image serving exactly ``size`` bytes.

    ``iterations=None`` keeps cryptsetup's default PBKDF2 cost (its 2 s benchmark).
    """
    sparse_file(path, size + (16 << 20))
    argv = [
        "cryptsetup",
        "luksFormat",
        "--batch-mode",
        "--type=luks1",
        "--cipher=aes-xts-plain64",
        "--key-size=512",
        "--hash=sha256",
        f"--key-file={passphrase_file}",
    ]
    if iterations is not None:
        argv.append(f"--pbkdf-force-iterations={iterations}")
    result = subprocess.run([*argv, path], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cryptsetup luksFormat {path} failed: {result.stderr.strip()}")
    with open(path, "r+b") as f:
        f.seek(_PAYLOAD_OFFSET_AT)
        (sectors,) = _PAYLOAD_OFFSET.unpack(f.read(_PAYLOAD_OFFSET.size))
        f.truncate(sectors * 512 + size)


def luks2_image(path: str, size: int, passphrase_file: str) -> None:
    """A LUKS2 aes-xts-plain64 (512-bit key) image with 4096-byte sectors serving ``size``
    bytes; a cheap PBKDF2 keyslot (throughput is measured here, not unlock)."""
    sparse_file(path, size + (16 << 20))
    argv = [
        "cryptsetup",
        "luksFormat",
        "--batch-mode",
        "--type=luks2",
        "--cipher=aes-xts-plain64",
        "--key-size=512",
        "--sector-size=4096",
        "--pbkdf=pbkdf2",
        "--pbkdf-force-iterations=1000",
        f"--key-file={passphrase_file}",
        path,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cryptsetup luksFormat {path} failed: {result.stderr.strip()}")
    dump = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", path],
        capture_output=True,
        text=True,
        check=True,
    )
    offset = int(json.loads(dump.stdout)["segments"]["0"]["offset"])
    with open(path, "r+b") as f:
        f.truncate(offset + size)
