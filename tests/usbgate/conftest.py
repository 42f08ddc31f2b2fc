"""Fixtures of usbgate's gateway tests: a real QEMU, a keystore and a `usbgate run` process.

Module-scoped: each test module gets its own QEMU and gateway, so the audit rows a module counts
are its own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.lab.qmp import QemuWithRedir, short_tmpdir
from tests.support.usbgate_qemu import USBGATE, VM, Keystore


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def qemu(workdir: Path) -> Iterator[QemuWithRedir]:
    vm = QemuWithRedir(workdir, slots=2)
    vm.start()
    yield vm
    vm.stop()


@pytest.fixture(scope="module")
def keystore(workdir: Path) -> Keystore:
    return Keystore(workdir / "keystore.db")


@pytest.fixture(scope="module")
def gateway(workdir: Path, qemu: QemuWithRedir, keystore: Keystore) -> Iterator[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(workdir / "usbgate.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [str(USBGATE), "run", "--vm", VM, "--listen", f"tcp:127.0.0.1:{port}",
         "--qemu", f"unix:{qemu.chardev_path(0)}", "--qemu", f"unix:{qemu.chardev_path(1)}",
         "--db", str(keystore.path), "--probe-timeout", "2", "-v",
         "--state", str(workdir / "usbgate.state")],
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while b"listening on" not in (workdir / "usbgate.log").read_bytes():
        assert proc.poll() is None, (workdir / "usbgate.log").read_text()
        assert time.monotonic() < deadline, "usbgate did not start"
        time.sleep(0.02)
    yield {"address": f"tcp:127.0.0.1:{port}", "proc": proc, "log": workdir / "usbgate.log",
           "state": workdir / "usbgate.state"}  # fmt: skip
    proc.terminate()
    proc.wait(10)
    log.close()
