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

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.lab import ROOT

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
def build_guest(guest_dir: str | None = None, variant: str = "virtio") -> Guest:
    """Run scripts/build-guest (a no-op when its cache is current) and return the images.

    variant "usb" is the generic kernel with xhci, usb-storage, sd and ext4 (see UsbGuest)."""
    argv = [sys.executable, "-m", "scripts.lab.build_guest", "--variant", variant]
    if guest_dir is not None:
        argv += ["--dir", str(Path(guest_dir).resolve())]
    out = subprocess.run(
        argv, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600
    ).stdout
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


# --- the USB guest (build-guest --variant usb, vmshield.mode=agent) ----------------------------

AGENT_READY = "VMSHIELD-AGENT-READY"
AGENT_END = re.compile(r"^VMSHIELD-AGENT-END rc=(\d+)$")


@dataclass(frozen=True)
class AgentResult:
    rc: int
    output: str


class UsbGuest:
    """The USB test guest under QEMU (TCG) with a qemu-xhci and ``slots`` usb-redir devices.

        guest = UsbGuest(build_guest(variant="usb"), workdir)
        guest.start()                                  # boots; returns once the agent is ready
        guest.run("wait_stick 10 && stick_copy data.bin out.txt hello")  # build-guest's helpers
        guest.console_since(t, "USB disconnect")       # kernel lines, host-timestamped
        guest.stop()

    Each usb-redir chardev is a unix socket server at ``chardev_path(n)`` (connect usbgate's
    --qemu or `usbgate simulate-stick --connect` there). The console (ttyS0) is read in a thread;
    every line keeps the host's time.time() of its arrival.
    """

    def __init__(self, guest: Guest, workdir: Path, *, slots: int = 1, memory: int = 256) -> None:
        self.guest, self.workdir, self.slots, self.memory = guest, workdir, slots, memory
        self.proc: subprocess.Popen[bytes] | None = None
        self.console: list[tuple[float, str]] = []
        self._agent: socket.socket | None = None
        self._agent_lines: list[str] = []
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []

    def chardev_path(self, slot: int = 0) -> str:
        return str(self.workdir / f"redir{slot}.sock")

    @property
    def qmp_path(self) -> str:
        return str(self.workdir / "qmp.sock")

    def argv(self) -> list[str]:
        agent = self.workdir / "agent.sock"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64,+rdrand",
            "-m", str(self.memory), "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", str(self.guest.kernel), "-initrd", str(self.guest.initrd),
            "-append", "console=ttyS0 panic=-1 quiet usb_storage.delay_use=0 "
            "usbcore.autosuspend=-1 vmshield.mode=agent",
            "-serial", "stdio",
            "-chardev", f"socket,id=agent,path={agent},server=on,wait=off",
            "-serial", "chardev:agent",
            "-device", "qemu-xhci,id=xhci",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        for n in range(self.slots):
            argv += ["-chardev", f"socket,id=ch{n},path={self.chardev_path(n)},server=on,wait=off",
                     "-device", f"usb-redir,chardev=ch{n},id=redir{n}"]  # fmt: skip
        return argv

    def start(self, timeout: float = 60) -> None:
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        self._spawn(self._read_console)
        deadline = time.monotonic() + timeout
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                agent.connect(str(self.workdir / "agent.sock"))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("QEMU did not start:\n" + self.console_text()) from None
                time.sleep(0.02)
        self._agent = agent
        self._spawn(self._read_agent)
        self._wait_line(lambda line: line == AGENT_READY, deadline)

    def _spawn(self, target: Any) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            with self._cond:
                self.console.append((time.time(), line))
                self._cond.notify_all()

    def _read_agent(self) -> None:
        assert self._agent is not None
        for raw in self._agent.makefile("rb"):
            with self._cond:
                self._agent_lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            self._agent_lines.append("")  # EOF
            self._cond.notify_all()

    def _wait_line(self, match: Any, deadline: float) -> None:
        with self._cond:
            while not any(match(line) for line in self._agent_lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    raise AssertionError("guest agent not ready; console:\n" + self.console_text())
                self._cond.wait(min(left, 0.5))

    def send(self, command: str) -> None:
        """Start `command` in the guest (one shell line); collect it with ``result``."""
        assert self._agent is not None and "\n" not in command
        with self._cond:
            self._agent_lines.clear()
        self._agent.sendall(command.encode() + b"\n")

    def result(self, timeout: float = 30) -> AgentResult:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for n, line in enumerate(self._agent_lines):
                    if m := AGENT_END.match(line):
                        output = "\n".join(self._agent_lines[:n])
                        del self._agent_lines[: n + 1]
                        return AgentResult(int(m.group(1)), output)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    raise AssertionError(f"guest command gave no result in {timeout} s; "
                                         f"console:\n{self.console_text()}")  # fmt: skip
                self._cond.wait(min(left, 0.5))

    def run(self, command: str, timeout: float = 30) -> AgentResult:
        self.send(command)
        return self.result(timeout)

    def console_text(self) -> str:
        return "\n".join(line for _, line in list(self.console))

    def console_since(self, since: float, needle: str) -> list[tuple[float, str]]:
        """Console lines containing `needle` that arrived at or after time.time() `since`."""
        return [(t, line) for t, line in list(self.console) if t >= since and needle in line]

    def wait_console(self, needle: str, since: float, timeout: float = 10) -> float:
        """The arrival time of the first console line with `needle` after `since`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (found := self.console_since(since, needle)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {needle!r} on the console in {timeout} s:\n"
                                         + self.console_text())  # fmt: skip
                self._cond.wait(min(left, 0.5))
        return found[0][0]

    def stop(self) -> None:
        if self._agent is not None:
            with contextlib.suppress(OSError):
                self._agent.sendall(b"quit\n")
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._agent is not None:
            self._agent.close()
        for thread in self._threads:
            thread.join(2)
