"""The plugin under real nbdkit: startup refusals, locks, passphrase forms, NBD semantics."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.osutil.extents import data_segments
from tests.support.nbd import (
    PLUGIN,
    SECRET,
    connect,
    luks1_image,
    nbdkit,
    plugin_args,
    qemu_read_luks,
    read_at,
    run_nbdkit_expect_failure,
    serve_plugin,
    sha256,
    write_at,
    write_secret,
)

SIZE = 8 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return luks1_image(tmp_path, SIZE)


def refused(args: list[str]) -> str:
    r = run_nbdkit_expect_failure(args)
    assert r.returncode != 0
    assert SECRET.decode() not in r.stderr
    return r.stderr


def test_wrong_passphrase_refuses_to_start_and_changes_nothing(image: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    write_secret(wrong, b"not the passphrase")
    before = sha256(image)
    err = refused(plugin_args(image, wrong))
    assert "no keyslot opens with this passphrase" in err
    assert sha256(image) == before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("magic", "not a LUKS image"),
        ("cipher", "not supported"),
        ("truncate-header", "truncated"),
        ("truncate-payload", "truncated"),
    ],
)
def test_bad_images_refuse_to_start_unchanged(
    image: Path, keyfile: Path, damage: str, message: str
) -> None:
    with image.open("r+b") as f:
        if damage == "magic":
            f.write(b"XXXX")
        elif damage == "cipher":
            f.seek(8)
            f.write(b"blowfish".ljust(32, b"\0"))
        elif damage == "truncate-header":
            f.truncate(100)
        else:
            f.truncate(4096 * 512 - 512)
    before = sha256(image)
    assert message in refused(plugin_args(image, keyfile))
    assert sha256(image) == before


def test_missing_image_and_bad_parameters(tmp_path: Path, keyfile: Path, image: Path) -> None:
    assert "no such image" in refused(plugin_args(tmp_path / "absent.img", keyfile))
    assert "unknown parameter colour=" in refused([*plugin_args(image, keyfile), "colour=red"])
    assert "discard=sometimes" in refused([*plugin_args(image, keyfile), "discard=sometimes"])
    assert "passphrase= is required" in refused(["python", PLUGIN, f"image={image}"])
    assert "passphrase file" in refused(
        ["python", PLUGIN, f"image={image}", f"passphrase=+{tmp_path}/nokey"]
    )


def test_second_writer_refused_readers_share(image: Path, keyfile: Path, sockdir: Path) -> None:
    with serve_plugin(image, keyfile, sockdir) as sock:
        write_at(sock, b"A" * 4096)
        err = refused(plugin_args(image, keyfile))
        assert "in use by another process" in err
        assert "in use" in refused(["-r", *plugin_args(image, keyfile)])
    with (
        serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-r",)) as s1,
        serve_plugin(image, keyfile, sockdir, nbdkit_opts=("--readonly",)) as s2,
    ):
        assert read_at(s1, 4096) == read_at(s2, 4096) == b"A" * 4096
        with connect(s1) as h:
            assert h.is_read_only()  # type: ignore[attr-defined]
        assert "in use" in refused(plugin_args(image, keyfile))


def test_passphrase_from_inherited_fd_and_literal(image: Path, sockdir: Path) -> None:
    r, w = os.pipe()
    os.write(w, SECRET)
    os.close(w)
    sock = str(sockdir / "fd.sock")
    proc = subprocess.Popen(
        [
            "nbdkit",
            "-f",
            "--exit-with-parent",
            "-U",
            sock,
            "-P",
            sock + ".pid",
            "python",
            PLUGIN,
            f"image={image}",
            f"passphrase=-{r}",
        ],
        pass_fds=(r,),
        stderr=subprocess.PIPE,
    )
    os.close(r)
    try:
        for _ in range(500):
            if os.path.exists(sock + ".pid") and os.path.getsize(sock + ".pid"):
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            import time

            time.sleep(0.02)
        assert len(read_at(sock, 512)) == 512
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert SECRET not in cmdline and SECRET not in environ
    finally:
        proc.terminate()
        proc.wait()
    # The literal form (tests only) works too.
    with nbdkit(
        "python", PLUGIN, f"image={image}", f"passphrase={SECRET.decode()}", sockdir=sockdir
    ) as sock2:
        assert len(read_at(sock2, 512)) == 512


def test_verbose_log_never_shows_the_passphrase(image: Path, keyfile: Path, sockdir: Path) -> None:
    sock = str(sockdir / "v.sock")
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-v", "-U", sock, *plugin_args(image, keyfile)], stderr=subprocess.PIPE
    )
    try:
        import time

        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        write_at(sock, b"x" * 4096)
        assert read_at(sock, 4096) == b"x" * 4096
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"python: config key=passphrase" in err  # the log is verbose...
    assert SECRET not in err  # ...but never holds the secret


def test_unaligned_io_fua_flush_and_size(image: Path, keyfile: Path, sockdir: Path) -> None:
    import nbd

    data = os.urandom(SIZE)
    with serve_plugin(image, keyfile, sockdir) as sock:
        write_at(sock, data)
        with connect(sock) as h:
            assert h.get_size() == SIZE  # type: ignore[attr-defined]
            assert h.can_multi_conn() and h.can_fua()  # type: ignore[attr-defined]
            assert h.get_block_size(nbd.SIZE_MINIMUM) == 1  # type: ignore[attr-defined]
            h.pwrite(b"hello", 510, nbd.CMD_FLAG_FUA)  # type: ignore[attr-defined]
            h.pwrite(b"Z" * 1000, 4000)  # type: ignore[attr-defined]
            assert h.pread(7, 509) == data[509:510] + b"hello" + data[515:516]  # type: ignore[attr-defined]
            h.flush()  # type: ignore[attr-defined]
            with pytest.raises(nbd.Error):
                h.pread(512, SIZE - 256)  # type: ignore[attr-defined]
    expected = bytearray(data)
    expected[510:515] = b"hello"
    expected[4000:5000] = b"Z" * 1000
    with serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-r",)) as sock:
        assert read_at(sock, SIZE) == bytes(expected)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_zero_without_discard_writes_encrypted_zeros(
    image: Path, keyfile: Path, sockdir: Path
) -> None:
    import nbd

    with serve_plugin(image, keyfile, sockdir) as sock:
        write_at(sock, os.urandom(SIZE))
        used = allocated(image)
        with connect(sock) as h:
            assert not h.can_trim()  # type: ignore[attr-defined]
            h.zero(1 << 20, 1 << 20)  # type: ignore[attr-defined]
            h.zero(100, 7)  # type: ignore[attr-defined]
            with pytest.raises(nbd.Error) as exc:
                h.zero(1 << 20, 0, nbd.CMD_FLAG_FAST_ZERO)  # type: ignore[attr-defined]
            assert "not supported" in str(exc.value)
            assert h.pread(1 << 20, 1 << 20) == bytes(1 << 20)  # type: ignore[attr-defined]
            assert h.pread(7, 100) == bytes(7)  # type: ignore[attr-defined]
    assert allocated(image) >= used  # nothing was unmapped
    raw = image.read_bytes()[4096 * 512 + (1 << 20) : 4096 * 512 + (2 << 20)]
    assert raw != bytes(len(raw))  # zeros are encrypted, not stored in the clear


def test_discard_unmap_trim_punches_holes_that_read_as_zeros(
    image: Path, keyfile: Path, sockdir: Path
) -> None:
    import nbd

    with serve_plugin(image, keyfile, sockdir, "discard=unmap") as sock:
        write_at(sock, os.urandom(SIZE))
        used = allocated(image)
        with connect(sock) as h:
            assert h.can_trim()  # type: ignore[attr-defined]
            # libnbd's argument order is (count, offset)
            h.trim(4 << 20, 1 << 20)  # type: ignore[attr-defined]
            h.zero(1 << 20, 1000)  # type: ignore[attr-defined] - unaligned edges
            with pytest.raises(nbd.Error):  # a zero is never fast: it writes ciphertext
                h.zero(4 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)  # type: ignore[attr-defined]
            assert h.pread(1 << 20, 1000) == bytes(1 << 20)  # type: ignore[attr-defined]
            h.trim(1 << 20, 6 << 20)  # type: ignore[attr-defined]
            assert h.pread(1 << 20, 6 << 20) == bytes(1 << 20)  # type: ignore[attr-defined]
            runs: list[tuple[int, int]] = []

            def collect(meta: str, offset: int, entries: list[int], err: int) -> int:
                runs.extend(zip(entries[::2], entries[1::2], strict=True))
                return 0

            h.block_status(SIZE, 0, collect)  # type: ignore[attr-defined]
    # The trimmed range is a hole in the file (st_blocks also counts extent-tree blocks,
    # so allocation is only checked loosely).
    base = luks.info(str(image))["payload_offset"]
    fd = os.open(image, os.O_RDONLY)
    try:
        holes = [(off - base, n) for off, n, data in data_segments(fd, base, base + SIZE)
                 if not data]  # fmt: skip
    finally:
        os.close(fd)
    covered = sum(n for off, n in holes if off >= 6 << 20 and off + n <= 7 << 20)
    assert covered == 1 << 20, holes
    # the zero wrote ciphertext into the trimmed range: no hole under [4 KiB, 1 MiB)
    assert not [h for h in holes if h[0] < 1 << 20 and h[0] + h[1] > 4096], holes
    assert allocated(image) <= used - (1 << 20)
    assert any(flags & nbd.STATE_HOLE for _, flags in runs)


def test_zeroed_range_reads_as_zeros_for_qemu_and_after_a_plain_copy(
    image: Path, keyfile: Path, sockdir: Path, tmp_path: Path
) -> None:
    """Issue 12 #8: with discard=unmap a zero (NO_HOLE absent: the client allows a hole)
    must still read as zeros through QEMU's luks driver and after `cp --sparse=never`."""
    with serve_plugin(image, keyfile, sockdir, "discard=unmap") as sock:
        write_at(sock, os.urandom(SIZE))
        with connect(sock) as h:
            h.zero(3 << 20, 2 << 20)  # type: ignore[attr-defined]
            h.flush()  # type: ignore[attr-defined]
    plain = tmp_path / "qemu.raw"
    qemu_read_luks(image, keyfile, plain)
    with plain.open("rb") as f:
        f.seek(2 << 20)
        assert f.read(3 << 20) == bytes(3 << 20)
    copy = tmp_path / "copy.img"
    subprocess.run(["cp", "--sparse=never", str(image), str(copy)], check=True)
    with serve_plugin(copy, keyfile, sockdir, nbdkit_opts=("-r",)) as sock:
        assert read_at(sock, 3 << 20, 2 << 20) == bytes(3 << 20)
