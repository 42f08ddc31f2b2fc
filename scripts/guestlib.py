"""Boot the tiny test guest of scripts/build-guest against an NBD server; helpers for the tests.

    guest = build_guest()                       # cached in var/guest (or $VMSHIELD_GUEST_DIR)
    with nbdkit("file", str(img), sockdir=d) as sock:
        run = boot(guest, sock, "write")        # mke2fs + /marker.txt + raw marker, poweroff
    assert run.done, run.console

The guest's disk layout (the disk must be at least DISK_SIZE bytes):
  [0, FS_BYTES)          ext2 made by the guest's busybox mke2fs; /marker.txt holds MARKER + "\\n"
  RAW_OFFSET             MARKER written raw (no filesystem) with dd
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_GUEST = ROOT / "scripts" / "build-guest"
PLUGIN = "nbd_plugin/plugin.py"  # relative: nbdkit runs from ROOT, as documented

MARKER = b"This is a test for virtual machine disk encryption!"
FS_BYTES = 32 * 1024 * 1024
RAW_OFFSET = 48 * 1024 * 1024
DISK_SIZE = 64 * 1024 * 1024

DONE = "VMSHIELD-GUEST-DONE"
FAIL = "VMSHIELD-GUEST-FAIL"


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path


@functools.cache
def build_guest(guest_dir: str | None = None) -> Guest:
    """Run scripts/build-guest (a no-op when its cache is current) and return the images."""
    argv = [sys.executable, str(BUILD_GUEST)]
    if guest_dir is not None:
        argv += ["--dir", guest_dir]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout
    values = dict(re.findall(r"^(VMLINUZ|INITRD)=(.*)$", out, re.M))
    return Guest(Path(values["VMLINUZ"]), Path(values["INITRD"]))


@dataclass(frozen=True)
class Boot:
    mode: str
    console: str
    returncode: int
    seconds: float

    @property
    def done(self) -> bool:
        """The guest's /init reached its end: every step of `mode` succeeded."""
        return f"{DONE} mode={self.mode}" in self.console.splitlines()

    def value(self, key: str) -> str | None:
        """The text after "KEY: " on the console (read mode prints VMSHIELD-FILE/-RAW)."""
        m = re.search(rf"^{re.escape(key)}: (.*?)\r?$", self.console, re.M)
        return m.group(1) if m else None


def qemu_argv(guest: Guest, socket: str | Path, mode: str) -> list[str]:
    """The QEMU command line: TCG (the nested KVM here cannot run Linux), disk over NBD."""
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-cpu", "qemu64,+rdrand",  # or the guest's mke2fs waits for entropy
        "-m", "256",
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", f"console=ttyS0 panic=-1 quiet vmshield.mode={mode}",
        "-drive", f"file=nbd+unix:///?socket={socket},format=raw,if=virtio",
    ]  # fmt: skip


def boot(guest: Guest, socket: str | Path, mode: str, *, timeout: float = 60) -> Boot:
    """Boot the guest once in `mode` (write|read|none) and return its console output.

    QEMU exits 0 even when the guest kernel panics: look at `.done`, not the exit status.
    """
    start = time.monotonic()
    try:
        proc = subprocess.run(
            qemu_argv(guest, socket, mode),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if e.stdout else ""
        raise AssertionError(f"guest did not power off within {timeout} s; console:\n{out}") from e
    console = proc.stdout.decode(errors="replace")
    return Boot(mode, console, proc.returncode, time.monotonic() - start)


@contextmanager
def nbdkit(*args: str, sockdir: Path, cwd: Path = ROOT, timeout: float = 20) -> Iterator[str]:
    """Serve `nbdkit [args]` on a unix socket in `sockdir` (keep it short: <= 107 bytes).

    Yields the socket path once nbdkit is ready (it writes its -P pidfile only then); on exit
    stops nbdkit with SIGTERM and waits, so the image is closed and flushed afterwards.
    """
    fd, name = tempfile.mkstemp(dir=sockdir, prefix="nbd", suffix=".sock")
    os.close(fd)
    os.unlink(name)
    sock, pidfile, errfile = Path(name), Path(name + ".pid"), Path(name + ".err")
    argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile), *args]
    with errfile.open("wb") as err:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + timeout
        while not (pidfile.exists() and pidfile.stat().st_size):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"nbdkit {' '.join(args)} did not start (exit {proc.poll()}):\n"
                    + errfile.read_text(errors="replace")
                )
            time.sleep(0.02)
        yield str(sock)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def read_export(socket: str, chunk: int = 4 * 1024 * 1024) -> bytes:
    """The whole export behind `socket`, read with libnbd."""
    import nbd  # Debian's python3-libnbd (the .venv sees system site-packages)

    h = nbd.NBD()
    h.connect_unix(socket)
    try:
        size = h.get_size()
        return b"".join(h.pread(min(chunk, size - off), off) for off in range(0, size, chunk))
    finally:
        h.shutdown()


def write_secret(path: Path, secret: bytes) -> None:
    """A passphrase file as nbdkit and cryptsetup read it: mode 0600, no trailing newline."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)


def make_luks1_image(path: Path, keyfile: Path, size: int = DISK_SIZE) -> None:
    """A LUKS1 aes-xts-plain64 container made by cryptsetup, `size` bytes of payload.

    The payload starts at 2 MiB (cryptsetup's LUKS1 alignment), so the file is size + 2 MiB.
    """
    with path.open("wb") as f:
        f.truncate(size + 2 * 1024 * 1024)
    subprocess.run(
        [
            "cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode",
            "--cipher", "aes-xts-plain64", "--key-size", "512", "--hash", "sha256",
            "--pbkdf-force-iterations", "1000", "--key-file", str(keyfile), str(path),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
