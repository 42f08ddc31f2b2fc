"""Overlapping writes that run at the same time never tear (PARALLEL thread model).

Each round two writers, each on its own thread (and in the nbdkit test on its own NBD
connection), write different bytes to overlapping ranges at once, at least one of them only
part of a sector or file block (a read-modify-write). Afterwards the disk must hold what one
of the two serial orders gives; a read-modify-write that read the unit before the other
write and wrote it back after would hold neither.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.serve.disk import EncryptedDisk
from tests.support.nbd import SECRET, connect, luks1_image, serve_plugin, write_secret

SIZE = 1 << 20
REGION = 16384
# (offset, length) pairs of the two writers: unaligned against aligned (the aligned write
# lands in a block the other one read-modifies-writes), and unaligned against unaligned.
PAIRS = [((100, 8192), (8192, 4096)), ((100, 8192), (4000, 5000)), ((512, 7000), (6000, 300))]
ROUNDS = 200

Write = Callable[[bytes, int], None]


def serial(before: bytes, *writes: tuple[int, bytes]) -> bytes:
    out = bytearray(before)
    for offset, data in writes:
        out[offset : offset + len(data)] = data
    return bytes(out)


def race(write_a: Write, write_b: Write, read: Callable[[], bytes]) -> None:
    """Round after round, both writers at once; the result must be one serial order."""
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(write: Write, jobs: list[tuple[int, bytes]]) -> None:
        try:
            for offset, data in jobs:
                barrier.wait()
                write(data, offset)
                barrier.wait()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    for (off_a, len_a), (off_b, len_b) in PAIRS:
        before = read()
        for r in range(ROUNDS):
            a = bytes([(2 * r + 1) & 0xFF]) * len_a
            b = bytes([(2 * r + 2) & 0xFF]) * len_b
            threads = [
                threading.Thread(target=writer, args=(write_a, [(off_a, a)])),
                threading.Thread(target=writer, args=(write_b, [(off_b, b)])),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            after = read()
            orders = (
                serial(before, (off_a, a), (off_b, b)),
                serial(before, (off_b, b), (off_a, a)),
            )
            if after not in orders:
                bad = next(i for i in range(REGION) if after[i] not in (orders[0][i], orders[1][i]))
                raise AssertionError(
                    f"pair {(off_a, len_a)}/{(off_b, len_b)} round {r}: torn at {bad}"
                )
            before = after


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return luks1_image(tmp_path, SIZE)


def test_threads_on_one_disk(image: Path) -> None:
    disk = EncryptedDisk(luks.open_volume(str(image), SECRET, readonly=False))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race window is microseconds
    try:

        def read() -> bytes:
            buf = bytearray(REGION)
            disk.pread(buf, 0)
            return bytes(buf)

        race(disk.pwrite, disk.pwrite, read)
    finally:
        sys.setswitchinterval(interval)
        disk.close()


@pytest.fixture
def served(image: Path, tmp_path: Path) -> Iterator[str]:
    key = tmp_path / "key"
    write_secret(key, SECRET)
    sockdir = Path(tempfile.mkdtemp(prefix="vmp", dir="/tmp"))
    try:
        with serve_plugin(image, key, sockdir) as sock:
            yield sock
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_two_connections(served: str) -> None:
    with connect(served) as h1, connect(served) as h2, connect(served) as reader:
        assert h1.can_multi_conn()  # type: ignore[attr-defined]

        def via(h: object) -> Write:
            return lambda data, offset: h.pwrite(data, offset)  # type: ignore[attr-defined]

        race(via(h1), via(h2), lambda: bytes(reader.pread(REGION, 0)))  # type: ignore[attr-defined]
