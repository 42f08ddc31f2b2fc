"""Issue 22 end to end: two real guests (QEMU TCG) of two VMs on ONE host disk server.

Both disks are served by `vmshield disk serve --unattended --bind-vm` (host key) as exports of
one host nbdkit. VM B's QEMU pointed at VM A's export is refused and audited. Both guests then
write numbered 4 KiB records, each with fsync, and print an ACK for each that came back; the
host server is SIGKILLed mid-way, `vmshield disk serve --restore` starts a new one and adds
both exports again (with their bindings), QEMU's NBD clients reconnect by themselves
(`reconnect-delay`) and the guests go on. Afterwards every acknowledged record of each guest
is on its own disk, read back through a server of its own (`--isolated`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystore.services import hostdisk, snippets
from keystore.services.nbdproc import HostFiles
from scripts.lab.guest import Guest, UsbGuest, build_guest
from tests.support.libvirt import Keystore, hook_keystore

pytestmark = [pytest.mark.slow, pytest.mark.qemu, pytest.mark.timeout(600)]

RECORDS = 40  # per guest
KILL_AFTER = 8  # ACKs of each guest before the SIGKILL
BLOCK = 4096
ACK = re.compile(r"^ACK (\d+)$")


class DiskGuest(UsbGuest):
    """The virtio test guest in agent mode (commands on ttyS1) whose /dev/vda is an export
    of the host disk server, as `vmshield disk serve` prints it (with reconnect-delay)."""

    def __init__(self, guest: Guest, workdir: Path, sock: Path, export: str, uuid: str) -> None:
        super().__init__(guest, workdir, slots=0, memory=128)
        self.sock, self.export, self.uuid = sock, export, uuid
        self.acks: list[tuple[float, int]] = []

    def argv(self) -> list[str]:
        agent = self.workdir / "agent.sock"
        blockdev = snippets.qemu_blockdev(str(self.sock), "d0", readonly=False,
                                          export=self.export).split()  # fmt: skip
        assert blockdev[0] == "-blockdev" and blockdev[2] == "-device"
        return [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64,+rdrand", "-m", "128",
            "-uuid", self.uuid, "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", str(self.guest.kernel), "-initrd", str(self.guest.initrd),
            "-append", "console=ttyS0 panic=-1 quiet vmshield.mode=agent",
            "-serial", "stdio",
            "-chardev", f"socket,id=agent,path={agent},server=on,wait=off",
            "-serial", "chardev:agent",
            "-blockdev", blockdev[1], "-device", "virtio-blk-pci,drive=d0",
        ]  # fmt: skip

    def _read_agent(self) -> None:  # keeps the ACK lines with their arrival time
        assert self._agent is not None
        for raw in self._agent.makefile("rb"):
            line = raw.decode(errors="replace").rstrip("\r\n")
            with self._cond:
                if m := ACK.match(line):
                    self.acks.append((time.monotonic(), int(m.group(1))))
                self._agent_lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._agent_lines.append("")
            self._cond.notify_all()

    def write_records(self, tag: str) -> None:
        """Start the writer: record n at block n, each written with fsync, then `ACK n`."""
        self.send(
            "while [ ! -b /dev/vda ]; do usleep 50000; done; n=0; "
            f"while [ $n -lt {RECORDS} ]; do "
            f"printf 'vmsREC {tag} %06d\\n' $n | dd of=/dev/vda bs={BLOCK} seek=$n "
            "conv=sync,notrunc,fsync 2>/dev/null || { echo FAILED $n; exit 1; }; "
            "echo ACK $n; n=$((n + 1)); done"
        )


def record(tag: str, n: int) -> bytes:
    return f"vmsREC {tag} {n:06d}\n".encode().ljust(BLOCK, b"\0")


@pytest.fixture
def ks() -> Iterator[Keystore]:
    with hook_keystore("vhg") as k:
        k.cli("vm", "add", "web2", "--owner", "alice")
        k.cli("disk", "create", "web2", "--size", "64M", "--pbkdf-iterations", "1000",
              "--password-file", str(k.pwfile))  # fmt: skip
        for vm, disk in (("web1", "web1-0"), ("web2", "web2-0")):
            k.cli("vm", "set", vm, "--unlock", "host-key")
            k.cli("disk", "enroll-host", disk, "--password-file", str(k.pwfile))
        yield k


def serve(ks: Keystore, disk: str) -> dict[str, Any]:
    out = ks.cli("disk", "serve", disk, "--unattended", "--bind-vm", "--run-dir",
                 str(ks.run_dir), "--json").stdout  # fmt: skip
    info: dict[str, Any] = json.loads(out)
    return info


def read_back(ks: Keystore, disk: str) -> bytes:
    """The first RECORDS blocks of `disk`, through an nbdkit of its own (no binding)."""
    import nbd

    sock = ks.base / f"{disk}.rd.sock"
    ks.cli("disk", "serve", disk, "--isolated", "--socket", str(sock), "--password-file",
           str(ks.pwfile))  # fmt: skip
    try:
        h = nbd.NBD()
        h.connect_uri(snippets.nbd_uri(str(sock)))
        data: bytes = h.pread(RECORDS * BLOCK, 0)
        h.shutdown()
        return data
    finally:
        ks.cli("disk", "stop", disk)


def test_two_guests_one_server_kill_restore_nothing_acknowledged_lost(ks: Keystore) -> None:
    guest = build_guest()
    a, b = serve(ks, "web1-0"), serve(ks, "web2-0")
    host = HostFiles(ks.run_dir)
    assert a["pid"] == b["pid"] == hostdisk.ping(host)
    sock = Path(a["socket"])

    # VM B's QEMU pointed at VM A's export: QEMU cannot open its drive, the refusal is audited
    wrong = DiskGuest(guest, ks.base, sock, "web1-0", b["bound_to_vm"]).argv()
    p = subprocess.run(wrong, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode != 0
    ks.cli("disk", "list")
    refused = [r for r in ks.audit(40) if r["action"] == "disk.export.refused"]
    assert refused and all(r["vm"] == "web1" for r in refused)
    assert f"carries -uuid {b['bound_to_vm']}" in str(refused[-1]["detail"])

    dirs = [ks.base / "ga", ks.base / "gb"]
    for d in dirs:
        d.mkdir()
    guests = {
        "A": DiskGuest(guest, dirs[0], sock, "web1-0", a["bound_to_vm"]),
        "B": DiskGuest(guest, dirs[1], sock, "web2-0", b["bound_to_vm"]),
    }
    try:
        started = [threading.Thread(target=g.start, kwargs={"timeout": 180})
                   for g in guests.values()]  # fmt: skip
        for t in started:
            t.start()
        for t in started:
            t.join()
        for tag, g in guests.items():
            g.write_records(tag)

        deadline = time.monotonic() + 180
        while min(len(g.acks) for g in guests.values()) < KILL_AFTER:
            assert time.monotonic() < deadline, {t: len(g.acks) for t, g in guests.items()}
            time.sleep(0.05)
        os.kill(a["pid"], signal.SIGKILL)
        killed = time.monotonic()
        while hostdisk.ping(host) is not None:
            time.sleep(0.02)
        out = json.loads(ks.cli("disk", "serve", "--restore", "--run-dir", str(ks.run_dir),
                                "--json").stdout)  # fmt: skip
        assert out["restored"] == {"web1-0": "host-key", "web2-0": "host-key"}, out
        new = hostdisk.ping(host)
        assert new is not None and new != a["pid"]

        for tag, g in guests.items():
            res = g.result(timeout=240)
            assert res.rc == 0, (tag, res.output[-2000:], g.console_text()[-2000:])
            assert [n for _, n in g.acks] == list(range(RECORDS))
            assert any(t > killed for t, _ in g.acks), f"guest {tag} wrote nothing after"
    finally:
        for g in guests.values():
            g.stop()
    # the reconnected QEMUs went through the new server: both exports still bound, still there
    exports = hostdisk.exports(host) or {}
    assert {n: e.bind.uuid if e.bind else None for n, e in exports.items()} == {
        "web1-0": a["bound_to_vm"], "web2-0": b["bound_to_vm"]}  # fmt: skip
    assert exports["web1-0"].bytes_written > 0 and exports["web2-0"].bytes_written > 0
    ks.cli("disk", "stop", "web1-0")
    ks.cli("disk", "stop", "web2-0")
    for disk, tag in (("web1-0", "A"), ("web2-0", "B")):
        data = read_back(ks, disk)
        for n in range(RECORDS):  # every acknowledged record, whole, on its own VM's disk
            assert data[n * BLOCK : (n + 1) * BLOCK] == record(tag, n), (disk, n)
