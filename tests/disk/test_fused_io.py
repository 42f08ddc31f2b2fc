"""The fused kernel calls: pread + decrypt and encrypt + pwrite in one GIL-free call.

``read_file``/``write_file`` go around numba's type dispatch to the compiled functions, which
check nothing (``kernels._entry``): these tests hand them what a buggy or hostile caller
would (read-only, strided, reversed, odd-sized buffers, IVs out of range) and check the
refusal and that no byte outside the buffer moved; and they check every status a kernel
returns (``ZERO_HEAD``, ``SHORT``) against real files, byte for byte against cryptography.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbd_plugin.crypto import vaes
from nbd_plugin.crypto.cbc import CbcCipher
from nbd_plugin.crypto.cbc_native import JitCbc
from nbd_plugin.crypto.layout import SHORT, ZERO_HEAD
from nbd_plugin.crypto.xts import XtsCipher
from nbd_plugin.crypto.xts_native import JitXts

NO_VAES = pytest.mark.skipif(
    vaes.unavailable() is not None, reason=f"the VAES kernel cannot run here: {vaes.unavailable()}"
)
KERNELS = [
    pytest.param("vaes-xts", marks=NO_VAES),
    "openssl-xts",
    "aes-ecb",
    "cbc-essiv",
]
MASK64 = (1 << 64) - 1


def make(kernel: str, sector: int) -> tuple[Any, Any]:
    """(the numba cipher on ``kernel``, the reference cipher) with one random key."""
    if kernel == "cbc-essiv":
        key = os.urandom(32)
        return JitCbc(key, "essiv:sha256", sector, sector // 512), CbcCipher(
            key, "essiv:sha256", sector, sector // 512
        )
    key = os.urandom(64)
    return JitXts(key, sector, sector // 512, kernel=kernel), XtsCipher(key, sector, sector // 512)


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    handle = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT, 0o600)
    yield handle
    os.close(handle)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("sector", [512, 4096])
@pytest.mark.parametrize("first", [0, 77, MASK64 - 3])
def test_write_then_read_match_the_reference_byte_for_byte(
    kernel: str, sector: int, first: int, fd: int
) -> None:
    cipher, reference = make(kernel, sector)
    plain = os.urandom(sector * 9)
    want = bytearray(len(plain))
    reference.encrypt(plain, want, first)
    at = 3 * sector + 1  # any file offset: the payload of a LUKS image starts anywhere
    assert cipher.write_file(memoryview(plain), fd, at, first) is None
    assert os.pread(fd, len(plain) + 10, at) == bytes(want)
    got = bytearray(len(plain))
    assert cipher.read_file(memoryview(got), fd, at, first, 0) == 0
    assert bytes(got) == plain


@pytest.mark.parametrize("kernel", KERNELS)
def test_read_only_source_writes_and_longer_scratch_writes_only_the_request(
    kernel: str, fd: int
) -> None:
    """nbdkit's write buffer is read-only; after a large write, the context's scratch is
    longer than a small one: only the small one's bytes may reach the file."""
    cipher, reference = make(kernel, 512)
    assert cipher.write_file(memoryview(os.urandom(512 * 300)), fd, 0, 0) is None
    os.ftruncate(fd, 0)
    small = bytes(os.urandom(1024))
    assert cipher.write_file(memoryview(small), fd, 0, 5) is None
    want = bytearray(1024)
    reference.encrypt(small, want, 5)
    assert os.pread(fd, 4096, 0) == bytes(want)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_zero_word_where_holes_are_looked_for_leaves_the_ciphertext(kernel: str, fd: int) -> None:
    """One of every ``stride`` words zero: ZERO_HEAD, the bytes as read (the caller decrypts
    and asks the file where its holes are); other zero words do not count."""
    cipher, _ = make(kernel, 4096)
    data = bytearray(os.urandom(4096 * 2))
    data[8:16] = bytes(8)  # word 1: not a head with stride 64
    os.pwrite(fd, data, 0)
    got = bytearray(len(data))
    assert cipher.read_file(memoryview(got), fd, 0, 0, 64) == 0
    data[4096 + 512 : 4096 + 520] = bytes(8)  # word 576 = 9 * 64: a head
    os.pwrite(fd, data, 0)
    assert cipher.read_file(memoryview(got), fd, 0, 0, 64) == ZERO_HEAD
    assert got == data
    assert cipher.read_file(memoryview(got), fd, 0, 0, 0) == 0  # stride 0: not looked for
    assert got != data


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_short_file_says_short_and_failing_io_raises_its_errno_at_once(
    kernel: str, fd: int, tmp_path: Path
) -> None:
    """Not redone behind the caller's back: a one-time EIO (NFS reports a lost write-back
    once) must reach the disk, which then refuses every later write and flush."""
    cipher, _ = make(kernel, 512)
    os.pwrite(fd, os.urandom(512 * 3), 0)
    got = bytearray(512 * 4)
    assert cipher.read_file(memoryview(got), fd, 0, 0, 0) == SHORT  # the file ends
    with pytest.raises(OSError) as exc:
        cipher.read_file(memoryview(got), 999_999, 0, 0, 0)
    assert exc.value.errno == errno.EBADF
    readonly = os.open(tmp_path / "image", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            cipher.write_file(memoryview(os.urandom(1024)), readonly, 0, 9)
    finally:
        os.close(readonly)
    assert exc.value.errno == errno.EBADF
    directory = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(IsADirectoryError):
            cipher.read_file(memoryview(got), directory, 0, 0, 0)
    finally:
        os.close(directory)


@pytest.mark.parametrize("kernel", KERNELS)
def test_buffers_the_compiled_code_must_not_get_are_refused(kernel: str, fd: int) -> None:
    cipher, _ = make(kernel, 512)
    os.pwrite(fd, os.urandom(512 * 8), 0)
    frozen = bytes(512 * 2)
    backing = bytearray(512 * 8)
    hostile = [
        memoryview(frozen),  # read-only: decrypting in place would change a bytes object
        memoryview(backing)[::2],  # strided: the kernel would write 2048 contiguous bytes
        memoryview(backing)[::-1][:1024],  # reversed: its first byte is the buffer's last
        memoryview(backing)[:700],  # not whole sectors
        memoryview(backing).cast("Q"),  # 8-byte items: length in items, not bytes
        # two dimensions: numba's unboxing writes 2 * ndim words into a 1-D array's struct
        memoryview(backing).cast("B", (8, 512)),
    ]
    for view in hostile:
        with pytest.raises(ValueError, match="read_file needs"):
            cipher.read_file(view, fd, 0, 0, 0)
    assert frozen == bytes(512 * 2)
    assert backing == bytearray(512 * 8)
    for view in hostile[1:]:
        with pytest.raises(ValueError, match="write_file needs"):
            cipher.write_file(view, fd, 0, 0)
    for iv in (-1, 1 << 64):
        with pytest.raises(OverflowError):
            cipher.read_file(memoryview(backing), fd, 0, iv, 0)
        with pytest.raises(OverflowError):
            cipher.write_file(memoryview(backing), fd, 0, iv)


@pytest.mark.parametrize("kernel", KERNELS)
def test_threads_read_and_write_at_once(kernel: str, fd: int) -> None:
    """The VAES kernel's reads share one state; the others take context sets from the pool."""
    cipher, reference = make(kernel, 4096)
    plain = os.urandom(4096 * 16)
    want = bytearray(len(plain))
    reference.encrypt(plain, want, 0)
    errors: list[str] = []

    def work(n: int) -> None:
        for i in range(150):
            j = (n * 5 + i) % 16
            piece = memoryview(plain)[j * 4096 : (j + 1) * 4096]
            if cipher.write_file(piece, fd, j * 4096, j * 8) is not None:
                errors.append("write")
            got = bytearray(4096)
            if cipher.read_file(memoryview(got), fd, j * 4096, j * 8, 0) or got != piece:
                errors.append(f"read {j}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.pread(fd, len(plain), 0) == bytes(want)


# ---- through the disk: what the statuses become ------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Any]:
    from nbd_plugin import luks
    from nbd_plugin.serve.disk import open_disk

    image = tmp_path / "disk.img"
    luks.create_image(str(image), 4 << 20, b"pw", iterations=1000)
    served = open_disk(str(image), b"pw", readonly=False, keyslot=None, discard="unmap")
    assert served.volume.cipher.read_file is not None  # the fused path runs here
    yield served
    served.close()


def test_an_image_truncated_while_served_is_reported_not_read_as_garbage(disk: Any) -> None:
    from nbd_plugin.errors import ImageError

    disk.pwrite(os.urandom(1 << 20), 0)
    os.ftruncate(disk.volume.fd, disk.volume.payload_offset + 4096 + 100)
    got = bytearray(8192)
    with pytest.raises(ImageError, match="unexpected end of image"):
        disk.pread(got, 0)


def test_holes_read_as_zeros_and_their_neighbours_as_written(disk: Any) -> None:
    """A punched block in the middle of a read: ZERO_HEAD, then the hole path."""
    data = os.urandom(256 << 10)
    disk.pwrite(data, 0)
    disk.trim(64 << 10, 8192)
    got = bytearray(len(data))
    disk.pread(got, 0)
    assert bytes(got) == data[: 64 << 10] + bytes(8192) + data[(64 << 10) + 8192 :]


def test_the_disk_takes_a_buffer_of_any_shape(disk: Any) -> None:
    """A C-contiguous byte buffer of several dimensions is cast to one, not refused (and
    never handed to the compiled code as it is: that overran the stack)."""
    data = os.urandom(1 << 16)
    disk.pwrite(memoryview(data).cast("B", (16, 4096)), 0)
    back = bytearray(1 << 16)
    disk.pread(memoryview(back).cast("B", (4, 64, 256)), 0)
    assert bytes(back) == data
