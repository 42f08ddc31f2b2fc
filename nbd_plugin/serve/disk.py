"""The plaintext view of an unlocked volume: what the nbdkit callbacks do, minus nbdkit.

Reads decrypt in place in the caller's buffer; aligned writes encrypt into a reusable scratch
buffer. Unaligned requests read-modify-write whole sectors. Requests may run in parallel
(nbdkit's PARALLEL thread model): every request that changes the image holds the byte range
it reads back or changes (``rangelock``), so a read-modify-write never puts back bytes another
request just wrote. Holes in a regular
image file read back as plaintext zeros, which makes trim and sparse images work through the
encryption; unmapping leaks which sectors are in use, so it only happens with
``discard="unmap"``, and only for trim: a zero request always writes encrypted zeros, because a
hole reads as zeros through vmshield alone (QEMU's luks driver, cryptsetup, or a copy that
fills holes, such as ``cp --sparse=never``, decrypt it to garbage).

A write-back error is sticky: once the image returned EIO, or fdatasync failed (the kernel
reports a lost write-back once, then forgets it), every later write, zero, trim and flush of
this server fails with EIO, so no flush can acknowledge data that never reached the medium.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from nbd_plugin.crypto import jit, mapped
from nbd_plugin.crypto.jit_cipher import failure
from nbd_plugin.crypto.layout import FAULTED, SHORT, ZERO_HEAD
from nbd_plugin.errors import ImageError
from nbd_plugin.luks import Volume, open_volume
from nbd_plugin.osutil.extents import data_segments, first_hole, punch_hole
from nbd_plugin.osutil.io import preadinto_all, pwrite_all
from nbd_plugin.serve.exclusive import claim
from nbd_plugin.serve.rangelock import RangeLock

DISCARD_POLICIES = ("ignore", "unmap")
ZERO_CHUNK = 1 << 20
SCRATCH_POOL = 8
#: requests of at least this many bytes are cut in two halves, one on a helper thread: the
#: numba kernels and pread/pwrite hold no GIL, so one connection's large request uses both
#: cores while nbdkit runs its requests one at a time (SERIALIZE_REQUESTS, plugin.py). Since
#: the VAES kernel (a MiB in ~85 us) the hand-off costs more than it saves at 1 MiB (A/B in
#: one run: nbdcopy write 1204 against 1110 MB/s unsplit, QEMU 1 MiB 2816/2507 against
#: 2681/2216) and still gains at 4 MiB (nbdcopy read 2329 against 1872): docs/performance.md
SPLIT_AT = 2 << 20
CHANNEL_MAX = 128 << 10
"""The largest request a ``Channel`` runs itself (bytes): QEMU's and nbdcopy's usual requests
(4-64 KiB clusters, 128 KiB reads) fit. A larger one takes the disk's general path, where
its ~1 us of Python is under 1 % of the request; and each connection's write scratch stays
this small."""
_helpers: ThreadPoolExecutor | None = None
_helpers_lock = threading.Lock()


def _helper_pool() -> ThreadPoolExecutor:
    global _helpers
    with _helpers_lock:
        if _helpers is None:
            _helpers = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="vmshield")
        return _helpers


def _in_halves(part: Callable[[memoryview, int], None], view: memoryview, offset: int,
               unit: int) -> None:  # fmt: skip
    """part(view, offset) as two calls on unit-aligned halves at once; the first error wins,
    and both halves are done (or failed) when this returns."""
    mid = len(view) // 2 // unit * unit
    other = _helper_pool().submit(part, view[mid:], offset + mid)
    try:
        part(view[:mid], offset)
    finally:
        failed = other.exception()  # waits: the buffer is the caller's once we return
    if failed is not None:
        raise failed


IV_MASK = (1 << 64) - 1
SMALL_HEADS = 32


def _mask(unit: int) -> int:
    """``x & _mask(unit)`` is 0 iff x is a multiple of ``unit`` (a power of two); for other
    units -1, so that only 0 passes (the general path then handles the request)."""
    return unit - 1 if unit & (unit - 1) == 0 else -1


class NotFast(Exception):
    """A fast zero was asked for but this zero would have to write data."""


def _log(message: str, level: str = "error") -> None:
    """One line in nbdkit's log (its stderr)."""
    print(f"nbdkit: vmshield: {level}: {message}", file=sys.stderr, flush=True)


def prepare_mapped_reads() -> None:
    """Install the SIGBUS guard of mapped reads (``crypto/mapped``) as soon as the kernels
    are loaded, on their loading thread: its numba compile takes ~0.1-0.3 s, which the first
    request after the load would otherwise wait for. A server calls it once it has forked."""

    def install() -> None:
        if jit.status() == "numba":
            mapped.install_guard()  # failing, it says why where the first image is mapped

    jit.when_decided(install)


def open_disk(
    image: str, passphrase: bytes, *, readonly: bool, keyslot: int | None, discard: str
) -> EncryptedDisk:
    """Unlock `image` (only `keyslot` if given), claim it against other writers
    (serve/exclusive.py) and serve it; the claim is released when the disk closes."""
    volume = open_volume(image, passphrase, readonly=readonly, keyslot=keyslot)
    try:
        held = claim(volume.fd, image, readonly=readonly)
    except BaseException:
        volume.close()
        raise
    disk = EncryptedDisk(volume, discard=discard)
    disk.held_fds = held
    return disk


class EncryptedDisk:
    """Sector-correct plaintext access to a Volume."""

    def __init__(self, volume: Volume, *, discard: str = "ignore") -> None:
        if discard not in DISCARD_POLICIES:
            raise ValueError(f"discard must be one of {', '.join(DISCARD_POLICIES)}")
        self.volume = volume
        self.discard = discard
        self.size = volume.size
        self.sector = volume.sector_size
        self._fd = volume.fd
        self._base = volume.payload_offset
        mode = os.fstat(self._fd).st_mode
        self._regular = stat.S_ISREG(mode)
        blksize = os.fstat(self._fd).st_blksize if self._regular else self.sector
        self._hole_align = max(blksize, self.sector)
        # A hole is at least a file block: checking the first word of every
        # min(block, sector) bytes finds every hole a read can meet.
        self._head_stride = max(min(blksize, self.sector), 8) // 8
        self._hole_stride = self._head_stride if self._regular else 0  # the fused read's
        self._heads: dict[int, struct.Struct] = {}
        # Writes cover whole filesystem blocks (see _span); block devices have no holes.
        self._write_unit = self._hole_align if self._regular else self.sector
        self._ranges = RangeLock()
        self._scratch: list[bytearray] = []
        # the numpy path holds the GIL: splitting gains nothing there
        self._split_at = SPLIT_AT if jit.expected() == "numba" else 1 << 63
        self._cipher = volume.cipher
        self._sector_mask = _mask(self.sector)
        self._unit_mask = _mask(self._write_unit)
        self._iv_base, self._iv_step = volume.iv_base, volume.iv_step
        self._broken: str | None = None
        self._flush_lock = threading.Lock()
        """Why the image can no longer be trusted to hold what was acknowledged, once it is."""
        self.held_fds: list[int] = []
        """Descriptors that keep the image claimed (see serve/exclusive.py); closed with us."""
        self._map: mapped.ImageMap | None = None
        self._map_tried = False
        self._map_tried_fault = False
        self._map_lock = threading.Lock()

    # ---- the sticky write-back error -----------------------------------------------------
    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Fail at once if the image is broken; break it on EIO or on a failed fdatasync."""
        if self._broken is not None:
            raise OSError(errno.EIO, self._broken)
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.EIO or what == "flush":
                self._break(what, exc)
            raise

    def _break(self, what: str, exc: OSError) -> None:
        if self._broken is not None:
            return
        self._broken = (
            f"{self.volume.path}: an earlier {what} failed ({exc.strerror or exc}); data the "
            "guest wrote may not be on the medium, so this server refuses every write and flush"
        )
        _log(
            f"{self.volume.path}: {what} failed ({exc.strerror or exc}): written data may be "
            "lost; from now on every write, zero, trim and flush of this server fails with EIO. "
            "Check the storage (dmesg), then restart the server."
        )

    @property
    def broken(self) -> bool:
        """True once a write-back error made every later write and flush fail."""
        return self._broken is not None

    # ---- helpers -------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"request {offset}+{length} is beyond the disk size {self.size}")

    def _take(self, length: int) -> bytearray:
        """A scratch buffer of at least ``length`` bytes (``list.pop`` is atomic: no lock)."""
        try:
            buf = self._scratch.pop()
        except IndexError:
            return bytearray(max(length, 1 << 16))
        return buf if len(buf) >= length else bytearray(max(length, 1 << 16))

    def _give(self, buf: bytearray) -> None:
        if len(self._scratch) < SCRATCH_POOL:
            self._scratch.append(buf)

    def _read_rest(self, view: memoryview, file_offset: int) -> None:
        """After a short read: read all of ``view`` again, or say where the image ended."""
        done = preadinto_all(self._fd, view, file_offset)
        if done < len(view):
            raise ImageError(
                f"{self.volume.path}: unexpected end of image at byte "
                f"{file_offset + done} (was it truncated while served?)"
            )

    def _write_raw(self, view: memoryview, file_offset: int) -> None:
        if os.pwrite(self._fd, view, file_offset) != len(view):
            pwrite_all(self._fd, view, file_offset)  # rewrites the bytes a short write wrote

    def _may_hold_holes(self, view: memoryview) -> bool:
        """Whether some sector (file block) of fresh ciphertext starts with 8 zero bytes.

        A hole reads as zeros, so a range without such a sector has no hole; real
        ciphertext starts with 8 zero bytes with probability 2^-64 per sector. This costs one
        strided numpy call instead of an lseek(SEEK_HOLE) per read, which on tmpfs walks the
        page cache from the offset to the next hole (milliseconds on a filled 1 GiB file).
        """
        count = len(view) // (self._head_stride * 8)
        if count <= SMALL_HEADS:  # struct beats numpy's call overhead for a few heads
            heads = self._heads.get(count)
            if heads is None:
                pad = self._head_stride * 8 - 8
                heads = self._heads[count] = struct.Struct("<" + f"Q{pad}x" * count)
            return 0 in heads.unpack_from(view)
        words = np.frombuffer(view, dtype=np.uint64)[:: self._head_stride]
        return bool(np.count_nonzero(words) < len(words))

    def _read_sectors(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` (whole sectors at aligned ``offset``) with plaintext."""
        if len(view) >= self._split_at:
            _in_halves(self._read_part, view, offset, self.sector)
        else:
            self._read_part(view, offset)

    def _read_part(self, view: memoryview, offset: int) -> None:
        start = self._base + offset
        iv = (self._iv_base + offset // self.sector * self._iv_step) & IV_MASK
        read_file = getattr(self._cipher, "read_file", None)  # the numba path's fused read
        if read_file is not None:
            status = read_file(view, self._fd, start, iv, self._hole_stride)
            if status:  # else read and decrypted: no sector head was zero, so no hole
                self._fused_read_rest(view, start, iv, status)
            return
        if os.preadv(self._fd, [view], start) != len(view):
            self._read_rest(view, start)
        self._decrypt_read(view, start, iv, self._regular and self._may_hold_holes(view))

    def _fused_read_rest(self, view: memoryview, start: int, iv: int, status: int) -> None:
        """Finish a fused read of ``view`` at file offset ``start`` that returned ``status``
        (``ZERO_HEAD``: ciphertext in ``view``; ``SHORT``: the image ended), or raise what
        its failure status means."""
        if status == ZERO_HEAD:
            holes = True
        elif status == SHORT:  # the image ended: read again here, which says where
            self._read_rest(view, start)
            holes = self._regular and self._may_hold_holes(view)
        else:
            raise failure(status)
        self._decrypt_read(view, start, iv, holes)

    def _decrypt_read(self, view: memoryview, start: int, iv: int, holes: bool) -> None:
        """Decrypt ciphertext just read into ``view``; where ``holes`` may be, zero them."""
        self._cipher.decrypt(view, view, iv)
        if holes and first_hole(self._fd, start) < start + len(view):
            for off, length, is_data in data_segments(self._fd, start, start + len(view)):
                if not is_data:
                    rel = off - start
                    view[rel : rel + length] = bytes(length)

    def _write_sectors(self, data: Any, offset: int) -> None:
        """Encrypt and write whole sectors of plaintext ``data`` at aligned ``offset``."""
        if len(data) >= self._split_at:
            view = data if type(data) is memoryview else memoryview(data).cast("B")
            _in_halves(self._write_part, view, offset, self.sector)
        else:
            self._write_part(data, offset)

    def _write_part(self, data: Any, offset: int) -> None:
        iv = (self._iv_base + offset // self.sector * self._iv_step) & IV_MASK
        at = self._base + offset
        write_file = getattr(self._cipher, "write_file", None)  # the numba path's fused write
        if write_file is not None:
            unwritten = write_file(data if type(data) is memoryview else memoryview(data),
                                   self._fd, at, iv)  # fmt: skip
            if unwritten is not None:  # pwrite wrote nothing (SHORT): write it again here
                pwrite_all(self._fd, unwritten, at)
            return
        length = len(data)
        scratch = self._take(length)
        try:
            out = memoryview(scratch)
            if len(scratch) != length:
                out = out[:length]
            self._cipher.encrypt(data, out, iv)
            self._write_raw(out, at)
        finally:
            self._give(scratch)

    def _fused_write_rest(self, out: memoryview, at: int, status: int) -> None:
        """Finish a fused write of the ciphertext ``out`` at file offset ``at`` that returned
        ``status`` (``SHORT``: nothing was written), or raise what its failure means."""
        try:
            if status != SHORT:
                raise failure(status)
            pwrite_all(self._fd, out, at)
        except OSError as exc:
            if exc.errno == errno.EIO:
                self._break("write", exc)
            raise

    def _span(self, offset: int, length: int, unit: int) -> tuple[int, int]:
        """[offset, offset+length) widened to ``unit`` boundaries of the file, within the disk.

        Writes are widened to whole filesystem blocks: writing one 512-byte sector into a
        hole would make the filesystem allocate the whole block with zero *ciphertext*
        around it, which decrypts to garbage instead of the zeros the hole stood for.
        """
        first = (self._base + offset) // unit * unit - self._base
        last = -(-(self._base + offset + length) // unit) * unit - self._base
        return max(first, 0), min(last, self.size)

    # ---- the operations ------------------------------------------------------------------
    def channel(self) -> Channel:
        """A way in for one connection, one request at a time (see ``Channel``)."""
        return Channel(self)

    def pread(self, buf: Any, offset: int) -> None:
        view = buf if type(buf) is memoryview and buf.format == "B" and buf.ndim == 1 else (
            memoryview(buf).cast("B")
        )  # fmt: skip
        n = len(view)
        self._check(offset, n)
        try:
            if not (offset | n) & self._sector_mask:  # whole sectors: straight to the part
                (self._read_part if n < self._split_at else self._read_sectors)(view, offset)
                return
            first, last = self._span(offset, len(view), self.sector)
            tmp = bytearray(last - first)
            self._read_sectors(memoryview(tmp), first)
            view[:] = tmp[offset - first : offset - first + len(view)]
        except OSError as exc:
            if exc.errno == errno.EIO:
                self._break("read", exc)
            raise

    def pwrite(self, buf: Any, offset: int, *, fua: bool = False) -> None:
        view = buf if type(buf) is memoryview and buf.format == "B" and buf.ndim == 1 else (
            memoryview(buf).cast("B")
        )  # fmt: skip
        n = len(view)
        self._check(offset, n)
        if self._broken is not None:
            raise OSError(errno.EIO, self._broken)
        end = offset + n
        at = self._base + offset
        # the common request goes from here straight to _write_part, no frame between: under
        # nbdkit a Python call costs about twice its in-process time (docs/performance.md,
        # "Thread states")
        try:
            if not (at | n) & self._unit_mask or (
                end == self.size and not at & self._unit_mask and not n & self._sector_mask
            ):  # whole write units (or the disk's tail): nothing to read back
                exclusive = self._ranges.enter(offset, end)
                try:  # as pread: straight to the part unless the request is split
                    (self._write_part if n < self._split_at else self._write_sectors)(view, offset)
                finally:
                    self._ranges.leave(offset, end, exclusive)
            else:
                self._read_modify_write(view, offset)
        except OSError as exc:  # what _writing("write") does, without a generator per write
            if exc.errno == errno.EIO:
                self._break("write", exc)
            raise
        if fua:
            self.flush()

    def _read_modify_write(self, view: memoryview, offset: int) -> None:
        """Write ``view`` at ``offset``, which starts or ends inside a write unit: read the
        units around it back, merge, write them, holding their range (serve/rangelock.py)."""
        end = offset + len(view)
        first, last = self._span(offset, len(view), self._write_unit)
        held = self._ranges.acquire(first, last)
        try:
            if first == offset and last == end:
                self._write_sectors(view, offset)
            else:
                tmp = bytearray(last - first)
                self._read_sectors(memoryview(tmp), first)
                tmp[offset - first : offset - first + len(view)] = view
                self._write_sectors(tmp, first)
        finally:
            self._ranges.release(held)

    def flush(self) -> None:
        # One fdatasync at a time: the kernel reports a failed write-back to one of two
        # concurrent callers only; the other must see the sticky error, not a success.
        with self._flush_lock, self._writing("flush"):
            os.fdatasync(self._fd)

    def _unmappable(self, offset: int, length: int) -> tuple[int, int]:
        """The part of [offset, offset+length) that can become a hole (file-block aligned)."""
        start = self._base + offset
        end = start + length
        a = -(-start // self._hole_align) * self._hole_align
        b = end // self._hole_align * self._hole_align
        return (a - self._base, b - a) if b > a else (offset, 0)

    def _punch(self, offset: int, length: int) -> None:
        """Punch whole file blocks, not while a read-modify-write of them is in flight."""
        held = self._ranges.acquire(offset, offset + length)
        try:
            punch_hole(self._fd, self._base + offset, length)
        finally:
            self._ranges.release(held)

    def _write_zeros(self, offset: int, length: int) -> None:
        """Write encrypted zeros; chunks end on write-unit boundaries so only edges RMW."""
        end = offset + length
        zeros = memoryview(bytes(min(max(length, 0), ZERO_CHUNK)))
        while offset < end:
            stop = min(
                end,
                (self._base + offset + ZERO_CHUNK) // self._write_unit * self._write_unit
                - self._base,
            )
            if stop <= offset:
                stop = min(end, offset + ZERO_CHUNK)
            self.pwrite(zeros[: stop - offset], offset)
            offset = stop

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """Make a range read as zeros for every reader: write encrypted zeros.

        ``may_trim`` (the client allows a hole) is not taken up: a hole reads as zeros only
        through vmshield, not through QEMU's luks driver or cryptsetup, nor after a copy that
        fills holes. So a zero is never fast (``fast`` raises NotFast: the client falls back).
        """
        self._check(offset, length)
        if fast:
            raise NotFast("zeroing writes encrypted zeros: it is never faster than a write")
        with self._writing("zero"):
            self._write_zeros(offset, length)
        if fua:
            self.flush()

    @property
    def can_trim(self) -> bool:
        return self.discard == "unmap" and self._regular

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Unmap whole file blocks inside the range (advisory: edges keep their data)."""
        self._check(offset, length)
        if not self.can_trim:
            return
        hole_off, hole_len = self._unmappable(offset, length)
        with self._writing("trim"):
            if hole_len:
                self._punch(hole_off, hole_len)
        if fua:
            self.flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs in plaintext coordinates."""
        self._check(offset, length)
        if not self._regular:
            return [(offset, length, True)]
        runs = data_segments(self._fd, self._base + offset, self._base + offset + length)
        return [(off - self._base, n, is_data) for off, n, is_data in runs]

    def image_map(self) -> mapped.ImageMap | None:
        """The payload mapped for the channels' reads (``crypto/mapped``), made on first use;
        None where it cannot be (not a regular file, no SIGBUS guard, mmap refused), and reads
        go through pread."""
        with self._map_lock:
            if not self._map_tried:
                self._map_tried = True
                if self._regular:
                    why = mapped.install_guard()
                    try:
                        if why is None:
                            self._map = mapped.ImageMap(self._fd, self._base, self.size)
                    except mapped.MapUnavailable as exc:
                        why = str(exc)
                    if why is not None:
                        _log(f"{self.volume.path}: reads go through pread: {why}", "warning")
            return self._map

    def map_faulted(self) -> None:
        """A page of the mapping faulted (the image was cut short or could not be read): say
        so once; every channel reads through pread from now on."""
        with self._map_lock:
            if self._map is not None and not self._map_tried_fault:
                self._map_tried_fault = True
                _log(f"{self.volume.path}: a page of the mapped image faulted (cut short, or "
                     "an I/O error); reading through pread from now on", "warning")  # fmt: skip

    def close(self) -> None:
        with self._map_lock:
            self._map_tried = True  # a channel made from now on (a racing open) maps nothing
            if self._map is not None:
                self._map.close()
                self._map = None
        for fd in self.held_fds:
            os.close(fd)
        self.held_fds = []
        self.volume.close()


class Channel:
    """One connection's way to a disk, for one request at a time.

    nbdkit runs a connection's requests one at a time on one thread (SERIALIZE_REQUESTS,
    plugin.thread_model), and at 4 KiB the Python around the kernel call is most of what
    vmshield adds to a request (docs/performance.md, "A channel per connection"). So a channel
    holds a context set of its own (``JitCipher.own_calls``: no pool to take it from) and
    the disk's constants, and runs the common request, a read of whole sectors or a write of
    whole write units, of at most ``CHANNEL_MAX`` bytes, in a nbdkit buffer, on the numba
    path, as one frame and one kernel call. Every other request goes to the disk, which
    remains the one place that defines what a request does; so does every request until the
    kernels are loaded. Writes hold the disk's range lock (``rangelock``) like the disk's own.

    It also stands in for the disk towards the plugin: ``size``, ``sector``, ``volume``,
    ``can_trim``, ``flush``, ``trim``, ``zero`` and ``extents`` are the disk's.
    """

    __slots__ = (
        "_base", "_calls", "_disk", "_fd", "_guard", "_image", "_iv_base", "_iv_step",
        "_map_delta", "_mapped", "_out", "_ranges", "_read", "_read_state", "_sector_mask",
        "_stride", "_unit_mask", "_write", "_write_state", "_write_writable", "can_trim",
        "sector", "size", "volume",
    )  # fmt: skip

    def __init__(self, disk: EncryptedDisk) -> None:
        self._disk = disk
        self.size = disk.size
        self.sector = disk.sector
        self.volume = disk.volume
        self.can_trim = disk.can_trim
        self._fd, self._base, self._stride = disk._fd, disk._base, disk._hole_stride
        self._sector_mask, self._unit_mask = disk._sector_mask, disk._unit_mask
        self._iv_base, self._iv_step = disk._iv_base, disk._iv_step
        self._ranges = disk._ranges
        self._read: Any = None
        self._write: Any = None
        self._mapped: Any = None
        self._prepare()

    def _prepare(self) -> None:
        """Take a context set of our own once the disk's cipher is on the numba path."""
        make = getattr(self._disk._cipher, "own_calls", None)
        try:
            calls = None if make is None else make(CHANNEL_MAX)
        except (OSError, MemoryError):  # no contexts now: the disk serves, and we try again
            return
        if calls is None:
            return
        self._calls = calls  # keeps the contexts alive
        self._read_state, self._write_state, self._out = (
            calls.read_state, calls.write_state, calls.out)  # fmt: skip
        self._write_writable = calls.write_writable
        self._read, self._write = calls.read, calls.write
        imap = self._disk.image_map()
        if imap is not None and not mapped.faulted(imap):
            self._image, self._guard = imap.image, imap.guard
            self._map_delta = self._base - imap.origin
            self._mapped = calls.mapped

    def pread(self, buf: Any, offset: int) -> None:
        n = len(buf)
        read = self._read
        if (
            read is None or not n or (offset | n) & self._sector_mask
            or not 0 <= offset <= self.size - n or type(buf) is not memoryview
            or buf.readonly or buf.ndim != 1 or buf.format != "B" or not buf.c_contiguous
        ):  # fmt: skip
            self._general(self._disk.pread, buf, offset)
            return
        iv = (self._iv_base + offset // self.sector * self._iv_step) & IV_MASK
        if self._mapped is not None:  # decrypt from the page cache: no pread, one pass
            status = self._mapped(
                self._read_state, buf, self._image, self._guard, offset + self._map_delta,
                self._stride, iv,
            )  # fmt: skip
            if status:  # holes, the mapping's end, a page that faulted: the disk reads
                if status == FAULTED:
                    self._unmap()
                self._disk.pread(buf, offset)
            return
        if n > CHANNEL_MAX:
            self._disk.pread(buf, offset)
            return
        start = self._base + offset
        status = read(self._read_state, buf, self._fd, start, self._stride, iv)
        if status:  # holes, the image's end, or an error: the disk finishes the read
            try:
                self._disk._fused_read_rest(buf, start, iv, status)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    self._disk._break("read", exc)
                raise

    def pwrite(self, buf: Any, offset: int, *, fua: bool = False) -> None:
        n = len(buf)
        at = self._base + offset
        write = self._write
        if (
            write is None or fua or not 0 < n <= CHANNEL_MAX or (at | n) & self._unit_mask
            or not 0 <= offset <= self.size - n or type(buf) is not memoryview
            or buf.ndim != 1 or buf.format != "B" or not buf.c_contiguous
            or self._disk._broken is not None
        ):  # fmt: skip
            self._general(self._disk.pwrite, buf, offset, fua=fua)
            return
        if not buf.readonly:
            write = self._write_writable
        end = offset + n
        iv = (self._iv_base + offset // self.sector * self._iv_step) & IV_MASK
        exclusive = self._ranges.enter(offset, end)
        try:
            status = write(self._write_state, buf, self._out, self._fd, at, iv)
            if status:  # nothing written, or an error: the disk finishes (within the range)
                self._disk._fused_write_rest(self._out[:n], at, status)
        finally:
            self._ranges.leave(offset, end, exclusive)

    def _unmap(self) -> None:
        """Read through pread from now on (the disk's mapping faulted)."""
        self._mapped = None  # the image and guard stay referenced until the channel closes
        self._disk.map_faulted()

    def _general(self, call: Callable[..., None], buf: Any, offset: int, **flags: bool) -> None:
        """A request through the disk's general path; on the numba path from now on, if the
        kernels were loaded since this channel was made."""
        if self._read is None:
            self._prepare()
        call(buf, offset, **flags)

    def flush(self) -> None:
        self._disk.flush()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._disk.trim(offset, length, fua=fua)

    def zero(self, offset: int, length: int, **flags: bool) -> None:
        self._disk.zero(offset, length, **flags)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self._disk.extents(offset, length)
