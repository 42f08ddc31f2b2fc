"""The overwrite engine: one pass of a pattern over a list of extents, and the read-back check.

Speed comes from doing what `dd bs=4M oflag=direct` does — large O_DIRECT writes from a
page-aligned buffer — with two writes in flight from worker threads, while the main thread
generates the next chunk's keystream (os.pwrite and OpenSSL both release the GIL). Positions
are counted linearly over the extents ("done" bytes of a pass), which is what the journal keeps.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from nbd_plugin.erase.keystream import AES_BLOCK, SLACK, Keystream
from nbd_plugin.erase.methods import Pattern
from nbd_plugin.errors import ImageError
from nbd_plugin.osutil import blockdev
from nbd_plugin.osutil.extents import Extent
from nbd_plugin.osutil.io import preadinto_all, pwrite_all

CHUNK = 8 << 20
DEPTH = 2
"""Writes in flight: two keep a virtio/NVMe queue busy while the next chunk is prepared."""
ZEROOUT_CHUNK = 256 << 20
_ROOM = CHUNK + AES_BLOCK + SLACK + 4096

Progress = Callable[[int], None]
"""Called with the bytes done so far in the current pass (or verification)."""


@dataclass
class Target:
    """The open target: a buffered fd, an O_DIRECT fd when the filesystem allows one.

    Both descriptors are the same open file: the path is resolved once (open_target) and
    every later step — identity, extents, writes, verification, unlink — goes through `fd`,
    `direct_fd` and `dir_fd`, never through the path again.
    """

    path: str
    fd: int
    direct_fd: int | None
    block_device: bool
    align: int
    zeroout: bool
    """BLKZEROOUT does a real overwrite here (a block device with WRITE ZEROES, not a loop)."""
    dir_fd: int = -1
    """The directory the target was opened in (unlink goes through it)."""
    name: str = ""
    """The target's name in `dir_fd`."""

    @property
    def fd_path(self) -> str:
        """A path to the open file itself, for helpers that take a path."""
        return f"/proc/self/fd/{self.fd}"

    def fd_for(self, offset: int, length: int) -> int:
        """O_DIRECT when offset and length are aligned, else the buffered fd."""
        if self.direct_fd is not None and not (offset | length) % self.align:
            return self.direct_fd
        return self.fd


def chunks(extents: list[Extent], done: int, size: int = CHUNK) -> Iterator[tuple[int, int, int]]:
    """(file offset, length, linear position after this chunk), skipping the first `done` bytes."""
    pos = 0
    for ext in extents:
        if pos + ext.length <= done:
            pos += ext.length
            continue
        skip = max(0, done - pos)
        off, end = ext.offset + skip, ext.offset + ext.length
        pos += skip
        while off < end:
            n = min(size, end - off)
            pos += n
            yield off, n, pos
            off += n


class Engine:
    """Writes and verifies passes on one target; owns two page-aligned buffers and a writer."""

    def __init__(self, target: Target, erase_key: bytes) -> None:
        self.target = target
        self._key = erase_key
        self._bufs = [mmap.mmap(-1, _ROOM) for _ in range(DEPTH + 1)]
        self._pool = ThreadPoolExecutor(max_workers=DEPTH, thread_name_prefix="erase-writer")

    def close(self) -> None:
        """Stop the writer thread and release the buffers."""
        self._pool.shutdown(wait=True)
        for b in self._bufs:
            # after an exception, views in its traceback still export the buffer: leave it to GC
            with contextlib.suppress(BufferError):
                b.close()

    def _fill_constant(self, byte: int) -> None:
        for b in self._bufs:
            b.seek(0)
            b.write(bytes([byte]) * len(b))

    def _write(self, view: memoryview, offset: int) -> None:
        pwrite_all(self.target.fd_for(offset, len(view)), view, offset)

    def run_pass(
        self,
        pattern: Pattern,
        pass_number: int,
        extents: list[Extent],
        done: int,
        progress: Progress,
    ) -> str:
        """Overwrite `extents` from linear position `done`; returns how ("write"/"blkzeroout").

        `progress(position)` is called after each chunk has reached the kernel; the caller
        checkpoints from there. No fdatasync here: the caller syncs at the end of the pass.
        """
        if pattern is Pattern.ZERO and self.target.zeroout:
            for off, n, pos in chunks(extents, done, ZEROOUT_CHUNK):
                blockdev.blk_range_ioctl(self.target.fd, blockdev.BLKZEROOUT, off, n)
                progress(pos)
            return "blkzeroout"
        stream = None
        fill = pattern.fill_byte
        if fill is None:
            stream = Keystream(self._key, pass_number, CHUNK)
        else:
            self._fill_constant(fill)
        # A buffer is refilled only once its write is done: DEPTH in flight + one being filled.
        pending: deque[tuple[Future[None], int]] = deque()
        for i, (off, n, pos) in enumerate(chunks(extents, done)):
            buf = memoryview(self._bufs[i % len(self._bufs)])
            view = buf[:n] if stream is None else stream.fill(buf, off, n)
            if len(pending) == DEPTH:
                fut, at = pending.popleft()
                fut.result()
                progress(at)
            pending.append((self._pool.submit(self._write, view, off), pos))
        while pending:
            fut, at = pending.popleft()
            fut.result()
            progress(at)
        return "write"

    def verify(
        self, pattern: Pattern, pass_number: int, extents: list[Extent], progress: Progress
    ) -> tuple[int, int | None]:
        """Read every byte of `extents` back and compare with the pass's pattern.

        Returns (bytes that differ, counted per 4 KiB block as 4096, first differing offset).
        Reads use O_DIRECT where aligned, so the page cache cannot answer for the medium.
        """
        fill = pattern.fill_byte
        stream = Keystream(self._key, pass_number, CHUNK) if fill is None else None
        expected_buf = memoryview(self._bufs[2])
        if fill is not None:
            expected_buf[:CHUNK] = bytes([fill]) * CHUNK
        reads = [memoryview(self._bufs[0]), memoryview(self._bufs[1])]
        todo = list(chunks(extents, 0))

        def read(i: int) -> int:
            off, n, _ = todo[i]
            return preadinto_all(self.target.fd_for(off, n), reads[i % 2][:n], off)

        # read chunk i+1 (worker thread) while chunk i is compared
        ahead = self._pool.submit(read, 0) if todo else None
        bad, first_bad = 0, None
        for i, (off, n, pos) in enumerate(todo):
            assert ahead is not None
            got_n = ahead.result()
            ahead = self._pool.submit(read, i + 1) if i + 1 < len(todo) else None
            if got_n != n:
                bad += n
                first_bad = off if first_bad is None else first_bad
                continue
            expected = expected_buf[:n] if stream is None else stream.fill(expected_buf, off, n)
            a = np.frombuffer(reads[i % 2][:n], dtype=np.uint8)
            b = np.frombuffer(expected, dtype=np.uint8)
            if not np.array_equal(a, b):
                diff = np.flatnonzero(a != b)
                blocks = np.unique(diff // 4096)
                bad += int(blocks.size) * 4096
                first_bad = off + int(diff[0]) if first_bad is None else first_bad
            progress(pos)
        return bad, first_bad


def _open_in_dir(path: str) -> tuple[int, int, str]:
    """(dir fd, fd, name): `path` opened read-write without following a final symlink."""
    directory, name = os.path.split(os.path.abspath(path))
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        return dir_fd, os.open(name, flags, dir_fd=dir_fd), name
    except BaseException:
        os.close(dir_fd)
        raise


def open_target(path: str, *, use_zeroout: bool = True) -> Target:
    """Open `path` once, read-write (plus an O_DIRECT reopen of the same file).

    A symbolic link is refused (ImageError): erasing through a link would overwrite its
    target but unlink only the link. Only a link to a block device (/dev/disk/by-id/...) is
    resolved, deliberately, and the device it names is opened.
    """
    try:
        dir_fd, fd, name = _open_in_dir(path)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        try:
            real = os.path.realpath(path)
            is_device = os.path.exists(real) and stat.S_ISBLK(os.stat(real).st_mode)
        except OSError:  # the name changed between the open and the look at the link
            raise ImageError(
                f"{path} changed while erase was opening it (a symbolic link came and went); "
                "nothing was written: name the image itself, in a directory only you can write"
            ) from None
        if is_device:
            target = open_target(real, use_zeroout=use_zeroout)
            target.path = path
            return target
        raise ImageError(
            f"{path} is a symbolic link (to {real}); erase refuses links, which would "
            "overwrite one file and unlink another: name the image itself"
        ) from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ImageError(f"{path} is neither a regular file nor a block device")
        os.set_blocking(fd, True)
        block = stat.S_ISBLK(st.st_mode)
        align = blockdev.logical_block_size(fd)
        direct_fd = _reopen_direct(fd, st)
        zeroout = block and use_zeroout and _device_zeroes_in_place(fd)
        return Target(path, fd, direct_fd, block, align, zeroout, dir_fd, name)
    except BaseException:
        os.close(fd)
        os.close(dir_fd)
        raise


def _reopen_direct(fd: int, st: os.stat_result) -> int | None:
    """The same file again with O_DIRECT (through /proc/self/fd, not the path)."""
    try:
        direct = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
    except OSError:
        return None  # tmpfs and some FUSE filesystems refuse O_DIRECT
    dst = os.fstat(direct)
    if (dst.st_dev, dst.st_ino) != (st.st_dev, st.st_ino):  # cannot happen; never write it
        os.close(direct)
        raise ImageError("reopening the target for O_DIRECT gave another file; nothing written")
    return direct


def _device_zeroes_in_place(fd: int) -> bool:
    """True for block devices whose WRITE ZEROES overwrites in place.

    A loop device turns BLKZEROOUT into fallocate(ZERO_RANGE) on its backing file, which marks
    extents unwritten and leaves the old bytes on the medium: plain writes there.
    """
    rdev = os.fstat(fd).st_rdev
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    if os.path.exists(f"{base}/loop"):
        return False
    for q in (f"{base}/queue", f"{base}/../queue"):
        try:
            with open(f"{q}/write_zeroes_max_bytes") as f:
                return int(f.read()) > 0
        except OSError:
            continue
    return False


def close_target(target: Target) -> None:
    """Close the fds."""
    if target.direct_fd is not None:
        os.close(target.direct_fd)
    os.close(target.fd)
    if target.dir_fd >= 0:
        os.close(target.dir_fd)


def sync(target: Target) -> float:
    """fdatasync the target; returns the seconds it took."""
    t = time.monotonic()
    os.fdatasync(target.fd)
    return time.monotonic() - t
