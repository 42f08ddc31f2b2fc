"""An image that a server holds cannot be erased; once the server is gone it can."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_plugin.erase import EraseOptions, erase
from nbd_plugin.errors import ImageBusy
from tests.support import ROOT
from tests.support.erase import key_file, make_luks, opens

PLUGIN = ROOT / "nbd_plugin" / "plugin.py"

HOLDER = """
import fcntl, sys, time
f = open(sys.argv[1], "rb")
fcntl.flock(f, fcntl.LOCK_EX if sys.argv[2] == "ex" else fcntl.LOCK_SH)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="er"))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _serve(img: Path, sock: Path, readonly: bool) -> subprocess.Popen[bytes]:
    cmd = [
        "nbdkit",
        "-f",
        "-U",
        str(sock),
        *(["-r"] if readonly else []),
        "python",
        str(PLUGIN),
        f"image={img}",
        f"passphrase=+{key_file(img.parent)}",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None:
            raise AssertionError(f"nbdkit exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("readonly", [False, True], ids=["read-write", "read-only"])
def test_erase_refused_while_nbdkit_serves_the_image(
    tmp_path: Path, sockdir: Path, readonly: bool
) -> None:
    if not PLUGIN.exists():
        pytest.skip("nbd_plugin/plugin.py not there yet")
    img = tmp_path / "served.img"
    make_luks(img)
    before = img.read_bytes()
    server = _serve(img, sockdir / "s", readonly)
    try:
        with pytest.raises(ImageBusy, match="in use: a server"):
            erase(str(img), "zero", EraseOptions(discard=False, unlink=False))
        assert img.read_bytes() == before
        assert not Path(str(img) + ".vmshield-erase").exists()
    finally:
        server.terminate()
        server.wait(10)
    cert = erase(str(img), "zero", EraseOptions(discard=False, unlink=False))
    assert cert.data["verification"]["result"] == "passed"
    assert not opens(img)


@pytest.mark.parametrize("mode", ["ex", "sh"])
def test_erase_refused_while_any_process_holds_the_lock(tmp_path: Path, mode: str) -> None:
    img = tmp_path / "locked.img"
    make_luks(img)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(img), mode], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(ImageBusy):
            erase(str(img), "crypto", EraseOptions(discard=False, unlink=False))
        assert opens(img)
    finally:
        holder.kill()
        holder.wait()
    erase(str(img), "crypto", EraseOptions(discard=False, unlink=False))
    assert not opens(img)
    assert os.path.exists(str(img) + ".erase-certificate.json")
