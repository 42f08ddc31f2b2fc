"""`usbgate host serve`: one usbgate process for several VMs, each with its own real QEMU.

Three VMs (vma with two usb-redir slots, vmb, vmc), three QEMUs (TCG, no guest), one keystore
and one `usbgate host serve` process started with vma (--vm) and vmb (a file in --vm-dir);
vmc is added and removed at run time over the control socket with `usbgate host add/remove`,
then through the directory and SIGHUP. The simulated owner is the
only fake. Each test checks that what it does to one VM leaves the other VMs' sessions alone.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.lab.qmp import QEMU, QemuWithRedir, short_tmpdir
from tests.support.usbgate_qemu import USBGATE, Keystore
from usbgate.simulator import FakeDevice, FakeOwner

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]

VMS = ("vma", "vmb", "vmc")
STICK = "allow id 0781:5567"


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp:127.0.0.1:{s.getsockname()[1]}"


class Rig:
    """The QEMUs, the keystore and the running `usbgate host serve`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.keystore = Keystore(workdir / "keystore.db", vms=VMS)
        self.qemu: dict[str, QemuWithRedir] = {}
        for vm in VMS:
            (workdir / vm).mkdir()
            self.qemu[vm] = QemuWithRedir(workdir / vm, slots=2 if vm == "vma" else 1)
            self.qemu[vm].start()
        self.address = {vm: _free_port() for vm in VMS}
        self.control = workdir / "usbgate.ctl"
        self.vm_dir = workdir / "vms"
        self.vm_dir.mkdir()
        self.write_conf("vmb")
        self.log_path = workdir / "usbgate.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        argv = [str(USBGATE), "host", "serve", "--control", str(self.control),
                "--db", str(self.keystore.path), "--probe-timeout", "2", "-v"]  # fmt: skip
        argv += ["--vm", self.spec("vma"), "--vm-dir", str(self.vm_dir)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + 15
        while b"host listening" not in self.log_path.read_bytes():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "usbgate host did not start"
            time.sleep(0.02)

    def spec(self, vm: str) -> str:
        slots = [self.qemu[vm].chardev_path(n) for n in range(2 if vm == "vma" else 1)]
        return f"{vm}={self.address[vm]}," + ",".join(f"unix:{p}" for p in slots)

    def write_conf(self, vm: str, text: str | None = None) -> None:
        """``vm``'s file in --vm-dir, as usbgate@vm.service reads it."""
        if text is None:
            qemu = self.qemu[vm].chardev_path(0)
            text = f"# {vm}\nUSBGATE_LISTEN={self.address[vm]}\nUSBGATE_QEMU=unix:{qemu}\n"
        (self.vm_dir / f"{vm}.conf").write_text(text)

    def reload(self) -> str:
        """SIGHUP, and what the host said about it."""
        mark = len(self.log())
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded" not in self.log()[mark:]:
            assert time.monotonic() < deadline, self.log()[mark:]
            time.sleep(0.02)
        return self.log()[mark:]

    def served(self) -> list[str]:
        return [v["vm"] for v in json.loads(self.usbgate("list", "--json").stdout)["vms"]]

    def usbgate(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(USBGATE), "host", *args, "--control", str(self.control)],
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def audit(self, action: str) -> list[tuple[str, dict[str, Any]]]:
        """(vm, detail) of the usbgate's ``action`` rows, oldest first."""
        with sqlite3.connect(f"file:{self.keystore.path}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT vm, detail FROM audit WHERE actor = 'usbgate' AND "
                                "action = ? ORDER BY seq", (action,)).fetchall()  # fmt: skip
        return [(vm, json.loads(detail)) for vm, detail in rows]

    def wait_audit(self, action: str, vm: str, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 5
        while True:
            rows = [d for v, d in self.audit(action) if v == vm]
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._log.close()
        for q in self.qemu.values():
            q.stop()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    workdir = short_tmpdir()
    r = Rig(workdir)
    yield r
    r.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _allowed(rig: Rig) -> Iterator[None]:
    for vm in VMS:
        rig.keystore.set_rules(STICK, vm=vm)
    yield
    assert rig.proc.poll() is None, f"usbgate host died: {rig.log()}"
    for q in rig.qemu.values():
        for slot in range(2 if q is rig.qemu["vma"] else 1):
            q.wait_attached(False, slot)


async def _attach(rig: Rig, vm: str) -> FakeOwner:
    owner = await FakeOwner.connect(rig.address[vm], FakeDevice())
    await asyncio.to_thread(rig.qemu[vm].wait_attached, True, 0, 10.0)
    return owner


def test_a_rule_change_for_one_vm_detaches_its_device_only(rig: Rig) -> None:
    async def scenario() -> None:
        a, b = await _attach(rig, "vma"), await _attach(rig, "vmb")
        mark = len(rig.log())
        await asyncio.to_thread(rig.keystore.prepend_rule, "block id 0781:5567", "vma")
        await asyncio.to_thread(rig.qemu["vma"].wait_attached, False, 0, 2.0)
        await asyncio.wait_for(a.closed.wait(), 5)
        await asyncio.sleep(0.3)  # B would be detached by now if the change had reached it
        assert rig.qemu["vmb"].attached(0), "vma's rule change detached vmb's device"
        assert not b.closed.is_set()
        changed = rig.log()[mark:]
        assert "vm vma: rules changed" in changed
        assert "vm vmb: rules changed" not in changed  # vmb's sessions were not re-judged
        await a.close()
        await b.close()

    asyncio.run(scenario())
    [revoked] = rig.wait_audit("usb.revoked", "vma", 1)[-1:]
    assert revoked["device"]["vid_pid"] == "0781:5567"
    assert [vm for vm, _ in rig.audit("usb.revoked")] == ["vma"]  # rows are written in order


def test_a_live_allow_for_one_vm_admits_its_device_only(rig: Rig) -> None:
    for vm in ("vma", "vmb"):
        rig.keystore.set_rules("allow id 1111:*", vm=vm)

    async def scenario() -> None:
        a = await FakeOwner.connect(rig.address["vma"], FakeDevice())
        b = await FakeOwner.connect(rig.address["vmb"], FakeDevice())
        for owner in (a, b):
            await asyncio.wait_for(owner.filter_rejected.wait(), 5)
        await asyncio.to_thread(rig.keystore.prepend_rule, STICK, "vmb")
        await asyncio.to_thread(rig.qemu["vmb"].wait_attached, True, 0, 2.0)
        await asyncio.sleep(0.3)
        assert not rig.qemu["vma"].attached(0), "vmb's allow rule admitted vma's device"
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_a_malformed_stream_on_one_vm_leaves_the_others_attached(rig: Rig) -> None:
    async def scenario() -> None:
        b = await _attach(rig, "vmb")
        evil = await FakeOwner.connect(rig.address["vma"], FakeDevice(), announce=False)
        evil.writer.write(b"\xde\xad\xbe\xef" * 8)
        await asyncio.wait_for(evil.closed.wait(), 5)
        junk = socket.create_connection(("127.0.0.1", int(rig.address["vma"].rsplit(":")[-1])))
        junk.sendall(b"\xff" * 64)  # not even a hello
        await asyncio.sleep(0.3)
        junk.close()
        assert rig.qemu["vmb"].attached(0) and not b.closed.is_set()
        a = await _attach(rig, "vma")  # vma itself still serves the next owner
        await a.close()
        await b.close()

    asyncio.run(scenario())
    assert rig.proc.poll() is None, "usbgate host died"
    assert len(rig.wait_audit("usb.malformed", "vma", 2)) == 2  # garbage after and for hello
    assert {vm for vm, _ in rig.audit("usb.malformed")} == {"vma"}


def test_adding_and_removing_a_vm_at_run_time(rig: Rig) -> None:
    assert rig.served() == ["vma", "vmb"]
    vmc_qemu = f"unix:{rig.qemu['vmc'].chardev_path(0)}"
    added = rig.usbgate("add", "vmc", "--listen", rig.address["vmc"], "--qemu", vmc_qemu)
    assert added.returncode == 0, added.stderr
    assert f"vm vmc listening on {rig.address['vmc']}" in added.stdout

    # refused, and nothing changed: a VM the keystore does not know, a name or address in use
    for args, error in (
        (("nosuch", "--listen", _free_port(), "--qemu", "unix:/tmp/none.sock"), "nosuch"),
        (("vmc", "--listen", _free_port(), "--qemu", "unix:/tmp/none.sock"), "already served"),
        (("vmx", "--listen", rig.address["vma"], "--qemu", "unix:/tmp/n.sock"), "used by VM vma"),
    ):  # fmt: skip
        bad = rig.usbgate("add", *args)
        assert bad.returncode != 0 and error in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr

    async def scenario() -> None:
        b = await _attach(rig, "vmb")
        c = await _attach(rig, "vmc")
        listing = await asyncio.to_thread(rig.usbgate, "list", "--json")
        listed = {v["vm"]: v for v in json.loads(listing.stdout)["vms"]}
        assert listed["vmc"]["attached"] == 1 and listed["vmb"]["attached"] == 1
        removed = await asyncio.to_thread(rig.usbgate, "remove", "vmc")
        assert removed.returncode == 0, removed.stderr
        await asyncio.to_thread(rig.qemu["vmc"].wait_attached, False, 0, 2.0)
        await asyncio.wait_for(c.closed.wait(), 5)
        with pytest.raises(OSError):
            await FakeOwner.connect(rig.address["vmc"], FakeDevice())
        assert rig.qemu["vmb"].attached(0) and not b.closed.is_set()
        await b.close()
        await c.close()

    asyncio.run(scenario())
    assert "not served" in rig.usbgate("remove", "vmc").stderr
    assert rig.served() == ["vma", "vmb"]
    [row] = rig.wait_audit("usb.host.added", "vmc", 1)
    assert row["listen"] == rig.address["vmc"] and row["by"].startswith("uid 0")
    assert rig.wait_audit("usb.host.removed", "vmc", 1)
    rig.keystore.set_rules(STICK, vm="vmc")  # vmc's rules change while it is not served
    assert rig.proc.poll() is None


def test_the_control_socket_refuses_other_users(rig: Rig) -> None:
    assert rig.control.stat().st_mode & 0o777 == 0o600
    rig.control.chmod(0o666)  # let another user connect: SO_PEERCRED must still refuse it
    rig.workdir.chmod(0o711)
    try:
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        as_nobody = [*nobody, str(USBGATE), "host", "remove", "vma", "--control", str(rig.control)]
        out = subprocess.run(as_nobody, capture_output=True, text=True, timeout=30)
    finally:
        rig.control.chmod(0o600)
        rig.workdir.chmod(0o700)
    assert out.returncode != 0 and "uid 65534 may not control" in out.stderr, out.stderr
    assert rig.served() == ["vma", "vmb"]


def test_sighup_reads_the_vm_directory_again(rig: Rig) -> None:
    async def scenario() -> None:
        b = await _attach(rig, "vmb")
        rig.write_conf("vmc")
        said = await asyncio.to_thread(rig.reload)
        assert "serving 3 VM(s)" in said, said
        c = await _attach(rig, "vmc")
        # a broken file leaves its VM as it was: vmb keeps its device
        rig.write_conf("vmb", "USBGATE_LISTEN=tcp:nowhere\n")
        said = await asyncio.to_thread(rig.reload)
        assert "vmb.conf" in said and "VM vmb left as it was" in said, said
        assert rig.qemu["vmb"].attached(0) and not b.closed.is_set()
        # a file removed: its VM is no longer served, the others keep their devices
        (rig.vm_dir / "vmc.conf").unlink()
        said = await asyncio.to_thread(rig.reload)
        await asyncio.to_thread(rig.qemu["vmc"].wait_attached, False, 0, 2.0)
        await asyncio.wait_for(c.closed.wait(), 5)
        assert rig.qemu["vmb"].attached(0) and not b.closed.is_set()
        await b.close()
        await c.close()

    asyncio.run(scenario())
    rig.write_conf("vmb")
    assert rig.served() == ["vma", "vmb"]
    assert [row["by"] for row in rig.wait_audit("usb.host.removed", "vmc", 2)][-1] == "reload"
