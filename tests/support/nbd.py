"""Helpers shared by the disk-side tests: real nbdkit servers, libnbd clients, real tools."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nbd_plugin import luks
from scripts.lab import ROOT
from scripts.lab.guest import nbdkit, write_secret

PLUGIN = str(ROOT / "nbd_plugin" / "plugin.py")
SECRET = b"correct horse battery staple"

__all__ = ["PLUGIN", "ROOT", "SECRET", "nbdkit", "write_secret"]


def luks1_image(tmp_path: Path, size: int) -> Path:
    """A new LUKS1 image of ``size`` bytes under ``tmp_path`` (SECRET, a cheap PBKDF2)."""
    path = tmp_path / "disk.img"
    luks.create_image(str(path), size, SECRET, iterations=1000)
    return path


def plugin_args(image: Path, keyfile: Path, *extra: str) -> list[str]:
    return ["python", PLUGIN, f"image={image}", f"passphrase=+{keyfile}", *extra]


def filter_args(image: Path, keyfile: Path) -> list[str]:
    return ["--filter=luks", "file", str(image), f"passphrase=+{keyfile}"]


@contextmanager
def serve_plugin(
    image: Path, keyfile: Path, sockdir: Path, *extra: str, nbdkit_opts: tuple[str, ...] = ()
) -> Iterator[str]:
    with nbdkit(*nbdkit_opts, *plugin_args(image, keyfile, *extra), sockdir=sockdir) as sock:
        yield sock


@contextmanager
def connect(sock: str) -> Iterator[object]:
    import nbd

    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(sock)
    try:
        yield h
    finally:
        h.shutdown()


def write_at(sock: str, data: bytes, offset: int = 0) -> None:
    with connect(sock) as h:
        for pos in range(0, len(data), 4 << 20):
            h.pwrite(data[pos : pos + (4 << 20)], offset + pos)  # type: ignore[attr-defined]
        h.flush()  # type: ignore[attr-defined]


def read_at(sock: str, length: int, offset: int = 0) -> bytes:
    with connect(sock) as h:
        parts = [
            h.pread(min(4 << 20, length - pos), offset + pos)  # type: ignore[attr-defined]
            for pos in range(0, length, 4 << 20)
        ]
    return b"".join(parts)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_nbdkit_expect_failure(
    args: list[str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run nbdkit in the foreground expecting it to refuse to start."""
    return subprocess.run(
        ["nbdkit", "-f", "-U", "/tmp/vmshield-never.sock", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def cryptsetup_format(image: Path, keyfile: Path, size: int, *opts: str) -> None:
    with image.open("wb") as f:
        f.truncate(size + (2 << 20))
    subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "--type",
            "luks1",
            "--batch-mode",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            str(keyfile),
            *opts,
            str(image),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def cryptsetup_opens(image: Path, keyfile: Path) -> bool:
    r = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(keyfile), str(image)],
        capture_output=True,
        timeout=60,
    )
    return r.returncode == 0


def qemu_img(*args: str, retries: int = 40) -> subprocess.CompletedProcess[str]:
    """qemu-img, retried: this QEMU build fails with 'Unable to get accurate CPU usage' (a
    known upstream bug: its PBKDF calibration reads a thread CPU clock that ticks coarsely on
    this virtual machine), which says nothing about the image. Measured here: 15 of 20
    `create -f luks` runs fail, so a handful of retries was not enough (0.75^5 = 24 %)."""
    last: subprocess.CompletedProcess[str] | None = None
    for _ in range(retries):
        last = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
        if last.returncode == 0 or "accurate CPU usage" not in last.stderr:
            return last
        time.sleep(0.2)
    assert last is not None
    return last


def qemu_luks_opts(image: Path) -> str:
    return f"driver=luks,key-secret=sec0,file.filename={image}"


def qemu_secret(keyfile: Path) -> str:
    return f"secret,id=sec0,file={keyfile}"


def qemu_read_luks(image: Path, keyfile: Path, out: Path) -> None:
    r = qemu_img(
        "convert",
        "--object",
        qemu_secret(keyfile),
        "--image-opts",
        qemu_luks_opts(image),
        "-O",
        "raw",
        str(out),
    )
    assert r.returncode == 0, r.stderr


def qemu_write_luks(image: Path, keyfile: Path, raw: Path) -> None:
    r = qemu_img(
        "convert",
        "-n",
        "--object",
        qemu_secret(keyfile),
        "-f",
        "raw",
        str(raw),
        "--target-image-opts",
        qemu_luks_opts(image),
    )
    assert r.returncode == 0, r.stderr


def qemu_create_luks(image: Path, keyfile: Path, size: int, *opts: str) -> None:
    o = ",".join(["key-secret=sec0", "iter-time=10", *opts])
    r = qemu_img(
        "create", "-f", "luks", "--object", qemu_secret(keyfile), "-o", o, str(image), str(size)
    )
    assert r.returncode == 0, r.stderr


@contextmanager
def qemu_client(
    sock: str, vm_uuid: str, cgroup: Path | None = None, export: str | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A QEMU of VM `vm_uuid` whose drive is the served disk (stopped before it runs code).

    `cgroup`: a cgroup directory the process is moved into before it execs QEMU.
    `export`: the NBD export name to ask for (a host server's disk)."""
    name = "" if export is None else f",export={export}"
    argv = [
        "qemu-system-x86_64", "-uuid", vm_uuid, "-name", "guest=t", "-S", "-accel", "tcg",
        "-machine", "none", "-nodefaults", "-display", "none", "-monitor", "none",
        "-blockdev", f"driver=nbd,server.type=unix,server.path={sock}{name},node-name=d0",
    ]  # fmt: skip
    procs = None if cgroup is None else cgroup / "cgroup.procs"

    def enter() -> None:
        if procs is not None:
            procs.write_text(str(os.getpid()))

    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, preexec_fn=enter if procs is not None else None,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
