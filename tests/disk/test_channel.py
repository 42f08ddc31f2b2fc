"""A connection's channel (serve/disk.Channel): the common request in one frame, the same bytes.

The channel runs reads of whole sectors and writes of whole write units up to CHANNEL_MAX
with a context set of its own and the kernels' entry points, which check nothing
(``kernels._entry``); everything else goes to the disk. These tests drive one image through
a channel and a copy of it through the disk with the same requests, including what a buggy
or hostile caller would send (every buffer kind, lengths around every limit, offsets below
zero and past the end), and require the same results, the same refusals and the same
image files, byte for byte; and that the channel really takes its own path.
"""

from __future__ import annotations

import array
import errno
import hashlib
import os
import random
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbd_plugin import luks
from nbd_plugin.crypto import jit, vaes
from nbd_plugin.crypto.jit_cipher import Warming
from nbd_plugin.errors import ImageError
from nbd_plugin.serve.disk import CHANNEL_MAX, Channel, EncryptedDisk
from tests.support.nbd import SECRET

SIZE = 2 << 20
CASES = 1500


@pytest.fixture(params=["luks1-xts-512", "luks2-xts-4096", "luks1-cbc-essiv"])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    if request.param == "luks1-xts-512":
        luks.create_image(str(path), SIZE, SECRET, iterations=1000)
    elif request.param == "luks2-xts-4096":
        luks.create_image(str(path), SIZE, SECRET, fmt="luks2", pbkdf="pbkdf2", iterations=1000,
                          sector_size=4096)  # fmt: skip
    else:
        luks.create_image(str(path), SIZE, SECRET, cipher="aes-cbc-essiv:sha256", key_bytes=32,
                          iterations=1000)  # fmt: skip
    return path


def open_disk(path: Path) -> EncryptedDisk:
    assert jit.kernels() is not None, "the numba path must run here: the channel is its path"
    return EncryptedDisk(luks.open_volume(str(path), SECRET, readonly=False))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def buffer(kind: str, data: bytes) -> Any:
    """``data`` as a caller might pass it: nbdkit's memoryviews and what it never passes."""
    if kind == "readonly-view":  # nbdkit's pwrite buffer
        return memoryview(data)
    if kind == "writable-view":  # nbdkit's pread buffer
        return memoryview(bytearray(data))
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "strided":  # every other byte of a view twice as long: not contiguous
        double = bytearray(2 * len(data))
        double[::2] = data
        return memoryview(double)[::2]
    if kind == "words":  # format "L", itemsize 8: len() counts words, not bytes
        return memoryview(array.array("L", data[: len(data) // 8 * 8]))
    if kind == "rows":  # 2-D bytes, contiguous and writable: len() counts rows
        n = len(data)
        if n == 0:  # no 2-D view of nothing
            return memoryview(bytearray())
        shape = [n // 8, 8] if n >= 8 else [1, n]
        return memoryview(bytearray(data[: shape[0] * shape[1]])).cast("B", shape)
    raise AssertionError(kind)


KINDS = ("readonly-view", "writable-view", "bytes", "bytearray", "strided", "words", "rows")


def outcome(call: Callable[[Any, int], None], buf: Any, offset: int) -> str:
    """What ``call(buf, offset)`` did: "ok", or the exception's type (the message names a
    path)."""
    try:
        call(buf, offset)
    except (ValueError, TypeError, OSError, ImageError) as exc:
        return type(exc).__name__
    return "ok"


def lengths(d: EncryptedDisk) -> list[int]:
    s = d.sector
    return [0, 1, s - 1, s, s + 1, 4096, 8192, 65536, CHANNEL_MAX - s, CHANNEL_MAX,
            CHANNEL_MAX + s, 3 * CHANNEL_MAX]  # fmt: skip


def offsets(d: EncryptedDisk, n: int, rng: random.Random) -> list[int]:
    s = d.sector
    return [0, rng.randrange(SIZE // s) * s, rng.randrange(SIZE), SIZE - n, SIZE - n + s,
            SIZE - n - 1, -s, -4096, -d._base, SIZE, 1 << 63]  # fmt: skip


@pytest.mark.parametrize("reads", ["mapped", "pread"])
def test_same_bytes_and_refusals_as_the_disk(image: Path, tmp_path: Path, reads: str) -> None:
    """Every request through a channel on one image and through the disk on its copy; the
    channel's reads decrypt from the mapped payload (``crypto/mapped``), or, where the image
    cannot be mapped, take the fused pread."""
    copy = tmp_path / "copy.img"
    # the holes too: a hole reads as zeros, the zeros a plain copy writes decrypt to noise
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    a, b = open_disk(image), open_disk(copy)
    try:
        channel = a.channel()
        assert channel._read is not None  # on its own path: not the disk compared with itself
        assert channel._mapped is not None
        if reads == "pread":
            channel._mapped = None
        rng = random.Random(25)
        seen: set[str] = set()
        for case in range(CASES):
            n = rng.choice(lengths(a))
            offset = rng.choice(offsets(a, n, rng))
            kind = rng.choice(KINDS)
            where = f"case {case}: {kind} {n} bytes at {offset}"
            if rng.random() < 0.5:
                data = os.urandom(n)
                got = outcome(channel.pwrite, buffer(kind, data), offset)
                want = outcome(b.pwrite, buffer(kind, data), offset)
                assert got == want, where
                seen.add(f"write {got}")
            else:
                mine, theirs = buffer(kind, bytes(n)), buffer(kind, bytes(n))
                got = outcome(channel.pread, mine, offset)
                want = outcome(b.pread, theirs, offset)
                assert got == want, where
                assert bytes(mine) == bytes(theirs), where
                seen.add(f"read {got}")
        a.flush()
        b.flush()
        assert digest(image) == digest(copy)
        # both paths ran, and both refused: the comparison was not of two refusals only
        assert {"write ok", "read ok", "write ValueError", "read ValueError"} <= seen, seen
    finally:
        a.close()
        b.close()


def test_the_common_request_takes_the_channel(image: Path) -> None:
    """With the disk's own fused calls broken, the channel's requests still work: it runs
    them itself, reads of any size from the mapping, and without it reads and writes of up
    to ``CHANNEL_MAX`` (a larger request, which is the disk's, fails)."""
    d = open_disk(image)
    try:
        channel = d.channel()
        plain = os.urandom(CHANNEL_MAX + d.sector)
        channel.pwrite(memoryview(plain[:CHANNEL_MAX]), 0)
        channel.pwrite(memoryview(plain[CHANNEL_MAX:]), CHANNEL_MAX)

        def broken(*args: Any) -> Any:
            raise AssertionError("the disk's path was taken")

        d._cipher.read_file = d._cipher.write_file = broken
        channel.pwrite(memoryview(plain[8192:16384]), 8192)
        got = memoryview(bytearray(len(plain)))
        channel.pread(got, 0)  # larger than CHANNEL_MAX: from the mapping
        assert got == plain
        with pytest.raises(AssertionError, match="disk's path"):
            channel.pwrite(memoryview(plain), 0)
        channel._mapped = None  # an image that cannot be mapped: the fused pread
        got = memoryview(bytearray(8192))
        channel.pread(got, 8192)
        assert got == plain[8192:16384]
        with pytest.raises(AssertionError, match="disk's path"):
            channel.pread(memoryview(bytearray(CHANNEL_MAX + d.sector)), 0)
    finally:
        d.close()


def test_offsets_outside_the_disk_leave_the_header_alone(image: Path) -> None:
    """An aligned offset below zero would land in the LUKS header (the keyslots) if only
    alignment were checked; past the end, in nothing of the disk. Each is refused and the
    image file does not change."""
    d = open_disk(image)
    try:
        before = digest(image)
        channel = d.channel()
        s = d.sector
        for offset in (-d._base, -4096, -s, -1, SIZE - s + 1, SIZE, SIZE + 4096, 1 << 62):
            for n in (s, 4096, CHANNEL_MAX):
                with pytest.raises(ValueError):
                    channel.pwrite(memoryview(bytes(n)), offset)
                with pytest.raises(ValueError):
                    channel.pread(memoryview(bytearray(n)), offset)
        d.flush()
        assert digest(image) == before
    finally:
        d.close()


def test_holes_and_a_truncated_image(image: Path) -> None:
    """A never-written range of a sparse image reads as zeros; an image cut short while
    served gives the disk's one-line error, not stale bytes."""
    d = open_disk(image)
    try:
        channel = d.channel()
        assert channel._read is not None
        payload = d._base
        with open(image, "r+b") as f:  # make the payload a hole, then write one block
            f.truncate(payload)
            f.truncate(payload + SIZE)
        channel.pwrite(memoryview(b"\x5a" * 4096), 65536)
        got = memoryview(bytearray(CHANNEL_MAX))
        channel.pread(got, 0)
        want = bytearray(CHANNEL_MAX)
        want[65536 : 65536 + 4096] = b"\x5a" * 4096
        assert got == want
        # the fused pread's way (a mapped read of it runs in test_mapped, in a process of
        # its own: the SIGBUS it takes is the guard's to handle)
        channel._mapped = None
        os.truncate(image, payload + SIZE // 2)
        with pytest.raises(ImageError, match="unexpected end of image"):
            channel.pread(memoryview(bytearray(8192)), SIZE - 8192)
    finally:
        d.close()


def test_channel_made_before_the_kernels_switches_to_them(image: Path) -> None:
    """A connection opened while the kernels load (a Warming cipher still on numpy) goes to
    the disk, then runs its own path once they are loaded."""
    d = open_disk(image)
    try:
        numba_cipher = d._cipher

        class NumpyPath:  # a cipher of the numpy path: no fused calls, no own_calls
            data_path = "numpy"

            def __init__(self, inner: Any) -> None:  # the same bytes as the numba cipher
                self.encrypt, self.decrypt = inner.encrypt, inner.decrypt
                self.sector_size = inner.sector_size

        warming = Warming(NumpyPath(numba_cipher))
        d._cipher = warming
        channel = d.channel()
        assert channel._read is None
        channel.pwrite(memoryview(b"\x11" * 4096), 0)  # the disk's path, keyword flags
        warming.use(numba_cipher)  # what jit's switch does once the kernels are loaded
        channel.pwrite(memoryview(b"\x22" * 4096), 4096)  # prepares on the way
        assert isinstance(channel, Channel) and channel._read is not None
        got = memoryview(bytearray(8192))
        channel.pread(got, 0)
        assert got == b"\x11" * 4096 + b"\x22" * 4096
    finally:
        d.close()


def test_a_channel_write_waits_for_a_read_modify_write_of_its_block(image: Path) -> None:
    """Another connection's read-modify-write has read the block and not yet written it
    back: a channel's write of that block waits for it (the disk's range lock), else the
    write-back would put back the bytes the channel's write just replaced."""
    d = open_disk(image)
    try:
        channel = d.channel()
        unit = d._write_unit
        has_read, go = threading.Event(), threading.Event()
        read_sectors = d._read_sectors

        def paused(view: memoryview, offset: int) -> None:
            read_sectors(view, offset)
            has_read.set()
            go.wait(10)

        d._read_sectors = paused  # type: ignore[method-assign]
        first = threading.Thread(target=d.pwrite, args=(b"\xaa" * (unit + 100), 100))
        first.start()
        assert has_read.wait(10)
        second = threading.Thread(target=channel.pwrite,
                                  args=(memoryview(b"\xbb" * unit), unit))  # fmt: skip
        second.start()
        second.join(0.3)
        waited = second.is_alive()
        go.set()
        first.join(10)
        second.join(10)
        assert waited, "the channel's write did not wait for the read-modify-write"
        got = memoryview(bytearray(2 * unit))
        channel.pread(got, 0)
        assert got == bytes(100) + b"\xaa" * (unit - 100) + b"\xbb" * unit  # first, then second
    finally:
        d.close()


def test_a_broken_disk_refuses_the_channels_writes(image: Path) -> None:
    """After a write-back error the disk refuses every write (docs: sticky EIO); a
    channel's 4 KiB write must not be acknowledged past it."""
    d = open_disk(image)
    try:
        channel = d.channel()
        assert channel._read is not None
        d._break("flush", OSError(errno.EIO, "Input/output error"))
        before = digest(image)
        with pytest.raises(OSError) as refused:
            channel.pwrite(memoryview(b"\x33" * 4096), 0)
        assert refused.value.errno == errno.EIO
        assert digest(image) == before
    finally:
        d.close()


def test_a_fua_write_is_flushed(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FUA: the write is on the medium when it is acknowledged (the disk flushes it)."""
    d = open_disk(image)
    try:
        channel = d.channel()
        synced: list[int] = []
        fdatasync = os.fdatasync

        def counted(fd: int) -> None:
            synced.append(fd)
            fdatasync(fd)

        monkeypatch.setattr(os, "fdatasync", counted)
        channel.pwrite(memoryview(b"\x44" * 4096), 0, fua=True)
        assert synced == [d._fd]
        channel.pwrite(memoryview(b"\x55" * 4096), 4096)
        assert synced == [d._fd]
    finally:
        d.close()


def test_no_contexts_for_a_channel_leaves_its_requests_to_the_disk(image: Path) -> None:
    """Keying a channel's own contexts fails (memory, libcrypto): its requests are the
    disk's, never a failed request; a later request takes its own path once it can."""
    d = open_disk(image)
    try:
        cipher = d._cipher
        own_calls = cipher.own_calls

        def no_memory(out_bytes: int) -> Any:
            raise MemoryError

        cipher.own_calls = no_memory
        channel = d.channel()
        assert channel._read is None
        channel.pwrite(memoryview(b"\x66" * 4096), 0)
        got = memoryview(bytearray(4096))
        channel.pread(got, 0)
        assert got == b"\x66" * 4096
        cipher.own_calls = own_calls
        channel.pread(got, 0)
        assert channel._read is not None and got == b"\x66" * 4096
    finally:
        d.close()


@pytest.mark.skipif(vaes.unavailable() is not None, reason=f"no VAES here: {vaes.unavailable()}")
def test_a_vaes_channel_shares_the_key_schedules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VAES kernel only reads its states (the key schedules): a connection's channel
    shares them instead of expanding the key again in Python (~2 ms per direction, with
    the GIL held, for every client that connects)."""
    image = tmp_path / "disk.img"
    luks.create_image(str(image), SIZE, SECRET, fmt="luks2", pbkdf="pbkdf2", iterations=1000,
                      sector_size=4096)  # fmt: skip
    d = open_disk(image)
    try:
        assert d._cipher.kernel_name == "vaes-xts"

        def expanded(*args: Any) -> int:
            raise AssertionError("the key was expanded again for a channel")

        monkeypatch.setattr(vaes, "fill_state", expanded)
        channels = [d.channel() for _ in range(3)]
        for i, channel in enumerate(channels):
            channel.pwrite(memoryview(bytes([i + 1]) * 4096), 4096 * i)
        got = memoryview(bytearray(3 * 4096))
        channels[0].pread(got, 0)
        assert got == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096
    finally:
        d.close()
