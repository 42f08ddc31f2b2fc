"""A real QEMU with usb-redir devices for usbgate's tests, watched over QMP and its stderr.

QEMU runs under TCG with no disk and no kernel (the firmware is enough to enumerate the xhci
bus); each ``usb-redir`` device listens on its own unix socket chardev.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QEMU = shutil.which("qemu-system-x86_64")


class Qmp:
    """A tiny synchronous QMP client (one command at a time)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb")
        self.lock = threading.Lock()  # one command at a time, whichever thread asks
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        with self.lock:
            self.file.write(json.dumps(msg).encode() + b"\n")
            self.file.flush()
            reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")
        return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@dataclass
class QemuWithRedir:
    """qemu-system-x86_64 with ``slots`` usb-redir devices (redir0, redir1, ...)."""

    workdir: Path
    slots: int = 1
    filter: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    qmp: Qmp | None = None
    stderr_lines: list[tuple[float, str]] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def chardev_path(self, slot: int) -> str:
        return str(self.workdir / f"redir{slot}.sock")

    def start(self) -> None:
        assert QEMU is not None
        qmp_path = str(self.workdir / "qmp.sock")
        argv = [QEMU, "-accel", "tcg", "-machine", "q35", "-nodefaults", "-display", "none",
                "-m", "64", "-device", "qemu-xhci,id=xhci"]  # fmt: skip
        for n in range(self.slots):
            device = f"usb-redir,chardev=ch{n},id=redir{n},debug=3"
            if self.filter is not None:
                device += f",filter={self.filter}"
            argv += ["-chardev", f"socket,id=ch{n},path={self.chardev_path(n)},server=on,wait=off",
                     "-device", device]  # fmt: skip
        argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)  # fmt: skip
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.qmp = Qmp(qmp_path)

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr_lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))

    def attached(self, slot: int = 0) -> bool:
        assert self.qmp is not None
        return bool(self.qmp.execute("qom-get", path=f"/machine/peripheral/redir{slot}",
                                     property="attached"))  # fmt: skip

    def wait_attached(self, want: bool, slot: int = 0, timeout: float = 5.0) -> float:
        """Poll until ``attached`` is ``want``; returns the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        while True:
            if self.attached(slot) == want:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"redir{slot} attached != {want} after {timeout} s")
            time.sleep(0.001)

    def lines(self, needle: str) -> list[str]:
        return [line for _, line in list(self.stderr_lines) if needle in line]

    def running(self) -> bool:
        return (
            self.proc is not None
            and self.proc.poll() is None
            and self.qmp is not None
            and self.qmp.execute("query-status")["status"] == "running"
        )

    def stop(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(ConnectionError, RuntimeError, OSError):
                self.qmp.execute("quit")
            self.qmp.close()
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(2)


def short_tmpdir() -> Path:
    """A fresh directory short enough for unix socket paths."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="ug", dir="/tmp"))


def env_without_proxy() -> dict[str, str]:
    return dict(os.environ)
