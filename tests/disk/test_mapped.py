"""Reads from the mapped payload (``crypto/mapped``) against what a mapping can do to a server.

A page of a mapping that is gone (the image cut short under the server) or unreadable (an
I/O error) raises SIGBUS, whose default action kills the server and every disk it serves.
Each case that could kill runs in a process of its own, so a missing guard fails the test
with the signal instead of taking pytest down.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nbd_plugin import luks
from nbd_plugin.crypto import jit, mapped
from nbd_plugin.errors import ImageError
from nbd_plugin.serve.disk import EncryptedDisk
from tests.support.nbd import SECRET, connect, qemu_read_luks, serve_plugin

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh Python process of this venv, from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


OPEN = """
    import os, sys
    from nbd_plugin import luks
    from nbd_plugin.crypto import jit, mapped
    from nbd_plugin.serve.disk import EncryptedDisk
    assert jit.kernels() is not None
    def open_disk(path):
        return EncryptedDisk(luks.open_volume(path, b"%s", readonly=False))
""" % SECRET.decode()  # noqa: UP031 (a script's text)


def fill(d: Any, channel: Any) -> bytes:
    """Random plaintext over the whole disk, written through ``channel`` and flushed."""
    data = os.urandom(d.size)
    for at in range(0, d.size, 1 << 17):
        channel.pwrite(memoryview(data[at : at + (1 << 17)]), at)
    d.flush()
    return data


@pytest.fixture(params=["luks1-xts-512", "luks2-xts-4096"])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    if request.param == "luks1-xts-512":
        luks.create_image(str(path), 8 * MIB, SECRET, iterations=1000)
    else:
        luks.create_image(str(path), 8 * MIB, SECRET, fmt="luks2", pbkdf="pbkdf2",
                          iterations=1000, sector_size=4096)  # fmt: skip
    return path


def test_cut_short_while_reads_run(image: Path) -> None:
    """One thread cuts the image short and makes it whole again (the tail then a hole), 300
    times, while another reads through a channel: every read gives the written bytes, the
    hole's zeros, or the disk's one-line error; the server process survives the SIGBUS its
    mapping takes, and reads through pread afterwards."""
    result = run(
        OPEN
        + """
    import random, threading
    from nbd_plugin.errors import ImageError
    from tests.disk.test_mapped import fill
    d = open_disk(sys.argv[1])
    channel = d.channel()
    assert channel._mapped is not None
    data = fill(d, channel)
    full = os.path.getsize(sys.argv[1])
    stop = threading.Event()

    def cut():
        for _ in range(300):
            os.truncate(sys.argv[1], full - d.size // 2)
            os.truncate(sys.argv[1], full)
        stop.set()

    cutter = threading.Thread(target=cut)
    cutter.start()
    rng = random.Random(1)
    seen = set()
    buf = memoryview(bytearray(1 << 16))
    while not stop.is_set() or len(seen) < 2:
        n = rng.choice((4096, 1 << 16))
        at = rng.randrange(0, d.size - n + 1, 4096)
        view = buf[:n]
        try:
            channel.pread(view, at)
        except ImageError as exc:
            assert "unexpected end of image" in str(exc), exc
            seen.add("error")
            continue
        if view == data[at : at + n]:
            seen.add("data")
        else:  # past the cut: the tail came back as a hole, and only there
            assert at + n > d.size // 2, at
            got = bytes(view)
            for s in range(0, n, d.sector):
                chunk = got[s : s + d.sector]
                assert chunk == data[at + s : at + s + d.sector] or chunk == bytes(d.sector)
            seen.add("hole")
    cutter.join()
    print("faulted", mapped.faulted(d._map), "mapped", channel._mapped is not None)
    print("seen", sorted(seen))
    d.close()
""",
        str(image),
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "faulted True mapped False" in result.stdout, result.stdout
    assert "reading through pread from now on" in result.stderr
    assert result.stderr.count("faulted") == 1, result.stderr  # said once
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("holes", ["checked", "not checked"])
def test_a_kernel_read_over_faulting_pages_says_so(image: Path, holes: str) -> None:
    """The mapped kernel itself: a read whose pages fault (past the cut) returns FAULTED,
    with the hole check on or off (without it, the decryption is what meets the fault), and
    so does every later read of that mapping, even of pages that are still there."""
    result = run(
        OPEN
        + """
    from nbd_plugin.crypto.layout import FAULTED
    d = open_disk(sys.argv[1])
    channel = d.channel()
    channel.pwrite(memoryview(os.urandom(1 << 17)), 0)
    channel.pwrite(memoryview(os.urandom(1 << 17)), d.size - (1 << 17))
    imap = d._map
    state, delta = channel._read_state, channel._base - imap.origin
    buf = memoryview(bytearray(1 << 16))
    def read(at, stride):
        return channel._mapped(state, buf, imap.image, imap.guard, at + delta, stride, 0)
    print("before", read(0, 0), read(d.size - (1 << 16), channel._stride))
    os.truncate(sys.argv[1], d._base + d.size // 2)
    stride = channel._stride if sys.argv[2] == "checked" else 0
    print("cut", read(d.size - (1 << 16), stride) == FAULTED)
    print("after", read(0, 0) == FAULTED, read(0, channel._stride) == FAULTED)
""",
        str(image),
        holes,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "before 0 0" in result.stdout, result.stdout
    assert "cut True" in result.stdout, result.stdout
    assert "after True True" in result.stdout, result.stdout


def test_closing_the_disk_lets_go_of_the_image(image: Path) -> None:
    """A mapping holds the open file, and with it the image's lock (serve/exclusive), until
    it is unmapped: closing the disk lets go of the file at once, even while a channel still
    holds the mapping's array; a read through that channel then fails with an error (no
    fault), and the address range goes away with the channel."""
    result = run(
        OPEN
        + """
    import gc
    def maps(what):
        return [l for l in open("/proc/self/maps") if what in l]
    d = open_disk(sys.argv[1])
    channel = d.channel()
    buf = memoryview(bytearray(1 << 16))
    channel.pread(buf, 0)
    start = "%x-" % d._map.image.ctypes.data
    print("mapped", len(maps(sys.argv[1])), len(maps(start)))
    d.close()
    print("closed", len(maps(sys.argv[1])), len(maps(start)))
    try:
        channel.pread(buf, 0)
    except OSError as exc:
        print("read", type(exc).__name__)
    again = open_disk(sys.argv[1])  # the lock is free: a second read-write open works
    del channel
    gc.collect()
    print("gone", len(maps(start)))
    again.close()
""",
        str(image),
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "mapped 1 1" in result.stdout, result.stdout
    assert "closed 0 1" in result.stdout, result.stdout
    assert "read OSError" in result.stdout, result.stdout
    assert "gone 0" in result.stdout, result.stdout


@pytest.mark.parametrize("how", ["fault", "kill"])
def test_a_fault_outside_every_mapping_still_kills(tmp_path: Path, image: Path, how: str) -> None:
    """The guard takes only faults inside the disks' mappings: any other SIGBUS (a fault of
    another mapping, or one sent by kill) keeps its default action, and the process dies of
    it as it would without the guard."""
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(MIB))
    result = run(
        OPEN
        + """
    import mmap
    import numpy as np
    d = open_disk(sys.argv[1])
    channel = d.channel()
    assert channel._mapped is not None and mapped.guarded()
    fd = os.open(sys.argv[2], os.O_RDWR)
    m = mmap.mmap(fd, 1 << 20, prot=mmap.PROT_READ)
    words = np.frombuffer(m, dtype=np.uint8)
    os.ftruncate(fd, 4096)
    print("touching", flush=True)
    if sys.argv[3] == "kill":
        import signal
        os.kill(os.getpid(), signal.SIGBUS)
    else:
        print(int(words[1 << 19]))
    print("survived", flush=True)
""",
        str(image),
        str(other),
        how,
    )
    assert "touching" in result.stdout, result.stderr[-2000:]
    assert "survived" not in result.stdout
    assert result.returncode == -signal.SIGBUS, (result.returncode, result.stderr[-2000:])


@pytest.mark.skipif(os.geteuid() != 0, reason="mlockall of MCL_FUTURE needs CAP_IPC_LOCK")
def test_the_mapping_is_not_locked_with_the_server(tmp_path: Path) -> None:
    """The serving process locks its memory (mlockall, MCL_FUTURE | MCL_ONFAULT), which
    would also pin every mapped page it ever read: mapping the payload and reading its 64
    MiB through a channel leaves the process's locked size (VmLck) and the machine's
    mlocked pages (Mlocked) where they were: the mapping is unlocked when it is made."""
    path = tmp_path / "big.img"
    luks.create_image(str(path), 64 * MIB, SECRET, fmt="luks2", pbkdf="pbkdf2",
                      iterations=1000, sector_size=4096)  # fmt: skip
    with path.open("r+b") as f:  # ciphertext everywhere: no holes, every page is read
        f.seek(path.stat().st_size - 64 * MIB)
        for _ in range(64):
            f.write(os.urandom(MIB))
    result = run(
        OPEN
        + """
    from nbd_plugin.serve.hardening import lock_all_memory
    def kib(path, key):
        for line in open(path):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    assert lock_all_memory() is None
    d = open_disk(sys.argv[1])
    buf = memoryview(bytearray(1 << 20))
    before = kib("/proc/self/status", "VmLck:"), kib("/proc/meminfo", "Mlocked:")
    channel = d.channel()  # maps the payload
    assert channel._mapped is not None
    for at in range(0, d.size, 1 << 20):
        channel.pread(buf, at)
    after = kib("/proc/self/status", "VmLck:"), kib("/proc/meminfo", "Mlocked:")
    print("grew", max(after[0] - before[0], after[1] - before[1]))
""",
        str(path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    grew = int(result.stdout.split("grew")[1])
    assert grew < 8 * MIB, grew


def test_served_image_cut_short(tmp_path: Path, keyfile: Path, sockdir: Path) -> None:
    """Through nbdkit: the image is cut short while served. A read past the cut fails with an
    error, not a dead server; reads before it still give the data, from pread."""
    import nbd

    path = tmp_path / "disk.img"
    luks.create_image(str(path), 16 * MIB, SECRET, fmt="luks2", pbkdf="pbkdf2",
                      iterations=1000, sector_size=4096)  # fmt: skip
    data = os.urandom(16 * MIB)
    with serve_plugin(path, keyfile, sockdir, "data_path=numba") as sock, connect(sock) as h:
        for at in range(0, len(data), 4 * MIB):
            h.pwrite(data[at : at + 4 * MIB], at)  # type: ignore[attr-defined]
        h.flush()  # type: ignore[attr-defined]
        assert h.pread(MIB, 12 * MIB) == data[12 * MIB : 13 * MIB]  # type: ignore[attr-defined]
        os.truncate(path, path.stat().st_size - 8 * MIB)
        with pytest.raises(nbd.Error) as failed:
            h.pread(MIB, 12 * MIB)  # type: ignore[attr-defined]
        assert failed.value.args[1] == errno.EIO
        assert h.pread(MIB, MIB) == data[MIB : 2 * MIB]  # type: ignore[attr-defined]
        with pytest.raises(nbd.Error):
            h.pread(4096, 16 * MIB - 4096)  # type: ignore[attr-defined]
        assert h.pread(4096, 0) == data[:4096]  # type: ignore[attr-defined]
    log = "".join(p.read_text(errors="replace") for p in sockdir.glob("*.err"))
    assert log.count("a page of the mapped image faulted") == 1, log
    assert "unexpected end of image" in log  # the disk's one line, as nbdkit reports it


def test_the_guard_is_ready_before_the_first_request(
    tmp_path: Path, keyfile: Path, sockdir: Path
) -> None:
    """The guard's numba compile (~0.1-0.3 s) runs on the kernels' loading thread, not in the
    first request after it (which a 4 KiB write benchmark's first pass paid: 306 MB/s
    against 468): the server catches SIGBUS before any request came."""
    path = tmp_path / "disk.img"
    luks.create_image(str(path), 4 * MIB, SECRET, iterations=1000)
    with serve_plugin(path, keyfile, sockdir, nbdkit_opts=("-v",)) as sock:
        pid = int(Path(sock + ".pid").read_text())
        log, deadline = Path(sock + ".err"), time.monotonic() + 120
        while "ready in" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        deadline = time.monotonic() + 20
        while not caught(pid) & (1 << (signal.SIGBUS - 1)):
            assert time.monotonic() < deadline, "no SIGBUS handler without a request"
            time.sleep(0.05)


def caught(pid: int) -> int:
    """The signals ``pid`` catches (SigCgt of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigCgt")


def open_disk(path: Path, **kw: Any) -> EncryptedDisk:
    assert jit.kernels() is not None, "the mapped reads are the numba path's"
    return EncryptedDisk(luks.open_volume(str(path), SECRET, readonly=False), **kw)


def test_cut_inside_a_sector(image: Path) -> None:
    """A cut inside a page raises no SIGBUS: the page cache zeroes the rest of the page. The
    sector the cut runs through must still give the disk's one-line error, as the pread path
    does, not its ciphertext and zeros decrypted as data (an attacker's review found it)."""
    d = open_disk(image)
    try:
        channel = d.channel()
        assert channel._mapped is not None
        data = os.urandom(1 << 16)
        channel.pwrite(memoryview(data), 0)
        for cut in (8192 + 100, 8192 + d.sector - 8, 8192 + 8):
            os.truncate(image, d._base + cut)
            got = memoryview(bytearray(8192))
            channel.pread(got, 0)  # before the cut: the data, from the mapping
            assert got == data[:8192]
            with pytest.raises(ImageError, match="unexpected end of image"):
                channel.pread(memoryview(bytearray(d.sector)), 8192)
            assert channel._mapped is not None  # nothing faulted: it stays mapped
    finally:
        d.close()


def test_a_trim_racing_a_read(image: Path) -> None:
    """A trim (a hole punched, discard=unmap) of the range a read is decrypting: the read
    gives each sector's data or the hole's zeros, never zero ciphertext decrypted (the
    mapped read checks the sector heads again after decrypting; without that, ~6 reads in
    3500 went wrong here)."""
    import random
    import threading

    d = open_disk(image, discard="unmap")
    try:
        channel = d.channel()
        assert channel._mapped is not None
        data, rng = os.urandom(MIB), random.Random(7)
        buf = memoryview(bytearray(MIB))
        deadline, trials, outcomes = time.monotonic() + 8, 0, set()
        while time.monotonic() < deadline:
            d.pwrite(memoryview(data), 0)
            trials += 1
            trim = threading.Thread(target=punch, args=(d, rng.random() * 0.0005))
            trim.start()
            while trim.is_alive():
                channel.pread(buf, 0)
                for s in range(0, MIB, d.sector):
                    sector = buf[s : s + d.sector]
                    if sector == data[s : s + d.sector]:
                        outcomes.add("data")
                    else:
                        assert sector == bytes(d.sector), (trials, s)
                        outcomes.add("zeros")
            trim.join()
        assert outcomes == {"data", "zeros"}, outcomes  # the race was run, both sides seen
    finally:
        d.close()


def punch(d: EncryptedDisk, pause: float) -> None:
    time.sleep(pause)
    d.trim(0, MIB)


def test_no_mapping_after_close_and_none_left_behind(image: Path) -> None:
    """A channel made after its disk closed (a client's open racing a host-mode removal)
    maps nothing: the descriptor number may belong to another file by then. And a closed
    disk leaves no mapping registered with the guard once its arrays are gone."""
    import gc

    before = mapped.mapped_count()
    unused = open_disk(image)
    number = unused._fd
    unused.close()  # before its first channel: the client's open lost the race
    other = os.open(image, os.O_RDONLY)  # the number now names another open file
    if other != number:
        os.dup2(other, number)
        os.close(other)
    try:
        assert unused.channel()._mapped is None and mapped.mapped_count() == before
    finally:
        os.close(number)
    d = open_disk(image)
    channel = d.channel()
    assert channel._mapped is not None and mapped.mapped_count() == before + 1
    d.close()
    late = d.channel()
    assert late._mapped is None and mapped.mapped_count() == before
    del channel, late
    gc.collect()
    assert mapped.mapped_count() == before


def test_a_payload_offset_off_the_page(tmp_path: Path, keyfile: Path) -> None:
    """cryptsetup can put a LUKS1 payload at any sector (--align-payload): the mapping then
    starts on the page before it. Mapped reads give the bytes the pread path gives, and the
    bytes QEMU's luks driver decrypts from the same image (cryptsetup made its header)."""
    path = tmp_path / "odd.img"
    path.write_bytes(b"")
    os.truncate(path, 8 * MIB)
    subprocess.run(
        ["cryptsetup", "luksFormat", "-q", "--type", "luks1", "--align-payload=2051",
         "--pbkdf-force-iterations", "1000", "--key-file", str(keyfile), str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    d = open_disk(path)
    try:
        assert d._base % 4096, d._base  # off the page, as asked
        channel = d.channel()
        assert channel._mapped is not None
        data = fill(d, channel)
        got, theirs = memoryview(bytearray(d.size)), memoryview(bytearray(d.size))
        channel.pread(got, 0)
        d.pread(theirs, 0)
        assert got == theirs == data
    finally:
        d.close()
    out = tmp_path / "plain.raw"
    qemu_read_luks(path, keyfile, out)  # QEMU's luks driver decrypts what we wrote
    assert out.read_bytes() == data


def test_when_every_slot_is_taken_reads_use_pread(
    image: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """More images than the guard has slots (a host server with over 1024 disks): the next
    disk says why and reads through pread, with the same bytes."""
    saved = mapped._table.copy()
    mapped._table[1::2] = np.where(saved[1::2] == 0, 1, saved[1::2])  # all taken
    try:
        d = open_disk(image)
        try:
            channel = d.channel()
            assert channel._mapped is None and channel._read is not None
            data = os.urandom(8192)
            channel.pwrite(memoryview(data), 0)
            got = memoryview(bytearray(8192))
            channel.pread(got, 0)
            assert got == data
        finally:
            d.close()
    finally:
        mapped._table[:] = saved
    assert "images are mapped already" in capfd.readouterr().err
