"""Issue 20 B4: QEMU cannot open the ciphertext beside a vmshield server, nor the reverse.

QEMU's file driver locks bytes 100+perm / 200+unshared-perm of the image with OFD locks; a
server that only flocks is invisible to it. These tests use the real qemu-io."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.nbd import (
    ROOT,
    luks1_image,
    plugin_args,
    read_at,
    serve_plugin,
)

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return luks1_image(tmp_path, SIZE)


def qemu_io(image: Path, *opts: str) -> subprocess.CompletedProcess[str]:
    """qemu-io writes a sector (or, with -r, reads one) of the file itself."""
    cmd = "read 0 512" if "-r" in opts else "write -P 0x41 0 512"
    return subprocess.run(
        ["qemu-io", *opts, "-f", "raw", "-c", cmd, str(image)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextmanager
def qemu_holding(image: Path) -> Iterator[None]:
    """A qemu-io that keeps the image open read-write until the block ends."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", "raw", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        line = ""
        while "bytes at offset" not in line:  # it opened (and locked) before reading
            line = proc.stdout.readline()
            assert line, "qemu-io exited before reading"
        yield
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_qemu_cannot_write_an_image_a_server_holds(
    image: Path, keyfile: Path, sockdir: Path
) -> None:
    before = image.read_bytes()
    with serve_plugin(image, keyfile, sockdir) as sock:
        assert len(read_at(sock, 4096)) == 4096
        rw = qemu_io(image)
        ro = qemu_io(image, "-r")
    assert "lock" in rw.stdout + rw.stderr, rw.stdout + rw.stderr
    assert "lock" in ro.stdout + ro.stderr, ro.stdout + ro.stderr
    assert image.read_bytes() == before  # the write never happened
    # after the server stopped the locks are gone with it
    assert qemu_io(image).returncode == 0


def test_a_read_only_server_lets_qemu_read_but_not_write(
    image: Path, keyfile: Path, sockdir: Path
) -> None:
    with serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-r",)):
        rw = qemu_io(image)
        ro = qemu_io(image, "-r")
    assert "lock" in rw.stdout + rw.stderr, rw.stdout + rw.stderr
    assert ro.returncode == 0 and "lock" not in ro.stdout + ro.stderr, ro.stdout + ro.stderr


def test_server_refuses_an_image_qemu_has_open(image: Path, keyfile: Path) -> None:
    with qemu_holding(image):
        # a private socket (-U -); --run true: a server that did start exits 0 at once
        r = subprocess.run(
            ["nbdkit", "-U", "-", *plugin_args(image, keyfile), "--run", "true"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert r.returncode != 0
    assert "QEMU" in r.stderr and str(image) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
