"""EncryptedDisk's read fast path: holes are found from the ciphertext, not by lseek per read.

A read only asks the filesystem for holes when some sector of the ciphertext starts with
eight zero bytes; these tests check that holes still read as zeros, and that allocated
ciphertext that happens to start with zeros is decrypted, not zeroed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.osutil.extents import data_segments, first_hole
from nbd_plugin.serve.disk import EncryptedDisk

SECRET = b"xts disk test passphrase"
SIZE = 4 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[EncryptedDisk]:
    path = tmp_path / "disk.img"
    luks.create_image(str(path), SIZE, SECRET, iterations=1000)
    d = EncryptedDisk(luks.open_volume(str(path), SECRET, readonly=False), discard="unmap")
    try:
        yield d
    finally:
        d.close()


def read(d: EncryptedDisk, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    d.pread(buf, offset)
    return bytes(buf)


@pytest.mark.parametrize("length", [4096, 65536, 1 << 20])
def test_round_trip_and_holes_read_as_zeros(disk: EncryptedDisk, length: int) -> None:
    data = os.urandom(length)
    disk.pwrite(data, 0)
    assert read(disk, 0, length) == data
    assert read(disk, 2 << 20, length) == bytes(length)  # never written: a hole
    if length >= 65536:  # punch a 16 KiB hole (whole file blocks) into the middle
        disk.trim(16384, 16384)
        expected = data[:16384] + bytes(16384) + data[32768:]
        assert read(disk, 0, length) == expected


def test_hole_at_the_end_of_a_request(disk: EncryptedDisk) -> None:
    data = os.urandom(8192)
    disk.pwrite(data, 1 << 20)
    got = read(disk, (1 << 20) + 4096, 8192)  # half data, half hole
    assert got == data[4096:] + bytes(4096)


def test_allocated_ciphertext_starting_with_zeros_is_decrypted(disk: EncryptedDisk) -> None:
    """Zero heads only trigger the lseek check; allocated sectors still get decrypted."""
    disk.pwrite(os.urandom(8192), 0)
    base = disk.volume.payload_offset
    fd = disk.volume.fd
    os.pwrite(fd, bytes(8), base + 4096)  # sector 8 of the payload now starts with zeros
    assert all(is_data for _, _, is_data in data_segments(fd, base, base + 8192))
    raw = bytearray(os.pread(fd, 8192, base))
    disk.volume.cipher.decrypt(raw, raw, disk.volume.first_iv(0))
    got = read(disk, 0, 8192)
    assert got == bytes(raw)
    assert got[4096:4608] != bytes(512)


def test_hole_lookups_past_a_cut(tmp_path: Path) -> None:
    """A read whose image was cut short after its pread looks for holes past the new end:
    SEEK_HOLE/SEEK_DATA say ENXIO there, which is the end of the data, not an error to
    hand the client (found by test_mapped's race of cuts and reads)."""
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(8192))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert first_hole(fd, 0) == 8192
        assert first_hole(fd, 16384) == 16384  # no data from there on
        assert data_segments(fd, 4096, 20480) == [(4096, 4096, True), (8192, 12288, False)]
        assert data_segments(fd, 16384, 20480) == [(16384, 4096, False)]
    finally:
        os.close(fd)
