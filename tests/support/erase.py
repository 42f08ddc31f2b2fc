"""Shared helpers of the erase tests: LUKS test images, block hashing, pattern checks."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from nbd_plugin.erase.keystream import Keystream

MIB = 1 << 20
BLOCK = 4096
PASSPHRASE = b"erase-test-passphrase"


def key_file(directory: Path) -> Path:
    """A passphrase file without a trailing newline."""
    f = directory / "key"
    if not f.exists():
        f.write_bytes(PASSPHRASE)
    return f


def make_luks(path: Path, size: int = 16 * MIB, *, version: int = 1, data: bool = True) -> None:
    """A cryptsetup LUKS image of `size` bytes with random "ciphertext" in two payload extents.

    Layout after the 2 MiB header (LUKS1): data [2, 10) MiB, hole [10, 12), data [12, 14),
    hole to the end. The holes are never written, as in a fresh image.
    """
    path.write_bytes(b"")
    os.truncate(path, size)
    cmd = ["cryptsetup", "luksFormat", "--type", f"luks{version}", "--batch-mode"]
    if version == 2:
        cmd += ["--pbkdf", "pbkdf2"]
    cmd += ["--pbkdf-force-iterations", "1000", "--key-file", str(key_file(path.parent))]
    subprocess.run([*cmd, str(path)], check=True, capture_output=True)
    if data:
        with open(path, "r+b") as f:
            for start, end in ((2, 10), (12, 14)):
                f.seek(start * MIB)
                f.write(os.urandom((end - start) * MIB))


def opens(path: Path) -> bool:
    """True when cryptsetup still opens the image with the test passphrase."""
    r = subprocess.run(
        [
            "cryptsetup",
            "open",
            "--test-passphrase",
            "--key-file",
            str(key_file(path.parent)),
            str(path),
        ],
        capture_output=True,
    )
    return r.returncode == 0


def block_digests(path: Path) -> set[bytes]:
    """Digests of every 4 KiB block that is not one repeated byte (those carry no ciphertext)."""
    out: set[bytes] = set()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            if block.count(block[:1]) != len(block):
                out.add(hashlib.sha256(block).digest())
    return out


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the data extents, by SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            pos = hole
    finally:
        os.close(fd)
    return out


def expected_pass_bytes(pattern: str, key: bytes, number: int, offset: int, length: int) -> bytes:
    """What pass `number` of pattern "00", "ff" or "random" writes at [offset, offset+length)."""
    if pattern == "00":
        return bytes(length)
    if pattern == "ff":
        return b"\xff" * length
    buf = memoryview(bytearray(length + 64))
    return bytes(Keystream(key, number, length).fill(buf, offset, length))


def read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy with exactly the source's holes (cp --sparse also turns zero blocks into holes)."""
    with open(dst, "wb") as out:
        out.truncate(src.stat().st_size)
        for off, n in data_extents(src):
            out.seek(off)
            out.write(read_range(src, off, n))
