"""Storage faults under a real nbdkit server: a full filesystem, a failing write-back.

Both faults are real: a tmpfs mounted by the test with a few MiB (writes past it fail with
ENOSPC), and a loop device over a sparse file on such a tmpfs, whose write-back fails when
the tmpfs is full: the block device's fdatasync then reports EIO once and, on a retry,
succeeds although the data never reached the file (issue 12 #12).
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from nbd_plugin import luks
from tests.support.faults import can_mount, loop_device, tiny_tmpfs
from tests.support.nbd import SECRET, connect, read_at, serve_plugin

pytestmark = pytest.mark.skipif(not can_mount(), reason="needs root (mount, losetup)")

MIB = 1 << 20


def _nbd_errno(exc: BaseException) -> int | None:
    """libnbd's Error carries the errno number as its second argument (.errno is a name)."""
    return exc.args[1] if len(exc.args) > 1 else None


# numba: every write is the fused kernel's encrypt + pwrite (a failed pwrite comes back to
# Python, which writes again and reports the errno); numpy: encrypt, then os.pwrite
DATA_PATHS = pytest.mark.parametrize("data_path", ["numba", "numpy"])


@DATA_PATHS
def test_sparse_image_on_a_full_filesystem(keyfile: Path, sockdir: Path, data_path: str) -> None:
    import nbd

    with tiny_tmpfs(6 * MIB) as fs:
        image = fs / "disk.img"
        luks.create_image(str(image), 32 * MIB, SECRET, iterations=1000)
        first = os.urandom(MIB)
        served = serve_plugin(image, keyfile, sockdir, f"data_path={data_path}")
        with served as sock, connect(sock) as h:
            h.pwrite(first, 0, nbd.CMD_FLAG_FUA)  # type: ignore[attr-defined]
            acked = {0: first}
            failed = None
            for i in range(1, 24):
                chunk = os.urandom(MIB)
                try:
                    h.pwrite(chunk, i * MIB)  # type: ignore[attr-defined]
                except nbd.Error as exc:
                    failed = exc
                    break
                acked[i * MIB] = chunk
            assert failed is not None, "the 6 MiB filesystem never filled up"
            assert _nbd_errno(failed) == errno.ENOSPC, failed
            h.flush()  # type: ignore[attr-defined] - nothing was lost: flushing works
            # the server stays consistent: acknowledged data reads back, allocated blocks
            # can still be rewritten
            for off, data in acked.items():
                assert h.pread(len(data), off) == data  # type: ignore[attr-defined]
            again = os.urandom(MIB)
            h.pwrite(again, 0, nbd.CMD_FLAG_FUA)  # type: ignore[attr-defined]
            acked[0] = again
        with serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-r",)) as sock:
            for off, data in acked.items():
                assert read_at(sock, len(data), off) == data


@DATA_PATHS
def test_failed_write_back_fails_every_later_write_and_flush(
    tmp_path: Path, keyfile: Path, sockdir: Path, data_path: str
) -> None:
    import nbd

    with tiny_tmpfs(6 * MIB) as fs:
        backing = fs / "disk.img"
        luks.create_image(str(backing), 24 * MIB, SECRET, iterations=1000)
        with loop_device(backing) as dev:
            durable = os.urandom(MIB)
            served = serve_plugin(dev, keyfile, sockdir, f"data_path={data_path}")
            with served as sock, connect(sock) as h:
                h.pwrite(durable, 0)  # type: ignore[attr-defined]
                h.flush()  # type: ignore[attr-defined] - acknowledged durable
                # 10 MiB into the page cache of a device whose backing store has ~3 MiB left
                for i in range(10):
                    h.pwrite(os.urandom(MIB), (8 + i) * MIB)  # type: ignore[attr-defined]
                with pytest.raises(nbd.Error):
                    h.flush()  # type: ignore[attr-defined] - the write-back failed
                # the kernel forgets the error after reporting it: the server must not
                with pytest.raises(nbd.Error) as exc:
                    h.flush()  # type: ignore[attr-defined]
                assert _nbd_errno(exc.value) == errno.EIO
                with pytest.raises(nbd.Error):
                    h.pwrite(os.urandom(4096), 0, nbd.CMD_FLAG_FUA)  # type: ignore[attr-defined]
                with pytest.raises(nbd.Error):
                    h.zero(4096, 4096)  # type: ignore[attr-defined]
                assert h.pread(MIB, 0) == durable  # type: ignore[attr-defined] - reads go on
            log = b"".join(p.read_bytes() for p in sockdir.glob("*.err")).decode()
            assert log.count("every write, zero, trim and flush of this server fails") == 1
            assert "Traceback" not in log.split("every write")[0][-400:]
        # nothing acknowledged was lost: the first MiB is on the file under the loop device
        with serve_plugin(backing, keyfile, sockdir, nbdkit_opts=("-r",)) as sock:
            got = read_at(sock, MIB)
        assert hashlib.sha256(got).digest() == hashlib.sha256(durable).digest()
