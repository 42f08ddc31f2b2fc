"""Large requests run as two halves at once (serve/disk.py, SPLIT_AT): the bytes are the
ones an unsplit request reads and writes, at every alignment around the cut, and a failing
half fails the whole request only after the other half is done with the caller's buffer."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.serve import disk as diskmod
from nbd_plugin.serve.disk import SPLIT_AT, EncryptedDisk
from tests.support.nbd import SECRET

SIZE = 4 << 20


@pytest.fixture(params=[512, 4096], ids=["luks1-512", "luks2-4096"])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    if request.param == 512:
        luks.create_image(str(path), SIZE, SECRET, iterations=1000)
    else:
        luks.create_image(str(path), SIZE, SECRET, fmt="luks2", pbkdf="pbkdf2", iterations=1000,
                          sector_size=4096)  # fmt: skip
    return path


def set_split(d: EncryptedDisk, split: bool) -> None:
    d._split_at = SPLIT_AT if split else 1 << 63


def open_disk(path: Path, split: bool) -> EncryptedDisk:
    d = EncryptedDisk(luks.open_volume(str(path), SECRET, readonly=False))
    set_split(d, split)
    return d


@pytest.mark.parametrize("length", [SPLIT_AT - 4096, SPLIT_AT, SPLIT_AT + 4096, 1 << 20,
                                    (1 << 20) + 8192, 3 << 20])  # fmt: skip
def test_split_and_unsplit_agree(image: Path, length: int) -> None:
    data = os.urandom(length)
    d = open_disk(image, True)
    try:
        d.pwrite(data, 8192)  # in halves
        set_split(d, False)
        back = bytearray(length)
        d.pread(back, 8192)
        assert back == data  # what the split write put there, read in one piece
        d.pwrite(data[::-1], 8192)
        set_split(d, True)
        back2 = bytearray(length)
        d.pread(back2, 8192)
        assert back2 == data[::-1]  # what one piece wrote, read in halves
    finally:
        d.close()


def test_a_failing_half_fails_the_request_after_both_are_done(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = open_disk(image, True)
    done: list[int] = []
    real = EncryptedDisk._read_part
    gate = threading.Event()

    def part(self: EncryptedDisk, view: memoryview, offset: int) -> None:
        if offset == 0:  # the first half fails at once ...
            gate.set()
            raise OSError(errno.EIO, "injected")
        gate.wait(5)
        real(self, view, offset)  # ... while the second half is still reading
        done.append(offset)

    monkeypatch.setattr(EncryptedDisk, "_read_part", part)
    try:
        with pytest.raises(OSError) as e:
            d.pread(bytearray(SPLIT_AT), 0)
        assert e.value.errno == errno.EIO
        assert done == [SPLIT_AT // 2]  # the other half had finished when pread raised
    finally:
        d.close()


def test_the_numpy_path_does_not_split(monkeypatch: pytest.MonkeyPatch, image: Path) -> None:
    monkeypatch.setattr(diskmod.jit, "expected", lambda: "numpy")
    d = EncryptedDisk(luks.open_volume(str(image), SECRET, readonly=False))
    try:
        assert d._split_at > d.size  # no request is ever split
    finally:
        d.close()
