"""libvirt drives vmshield: a real libvirtd (private, started here) runs the vmshield qemu hook.

`virsh start` of a domain built from `vmshield libvirt devices` serves the VM's encrypted disk
and its usbgate through the hook; the test guest (TCG) writes the thesis marker; `virsh
destroy` or the guest's poweroff stops everything. Unlocking: `vmshield vm unlock` (kernel
keyring) and `vmshield disk enroll-host` (host key keyslot). USB: the simulated owner's stick
attaches through usbgate to the libvirt-started QEMU and a rule change detaches it. A libvirtd
restart keeps disks and gate up (the hook's `reconnect`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keystore.services import hostdisk, unlock
from keystore.services.nbdproc import HostFiles
from nbd_plugin.luks import payload_region
from scripts.lab.guest import DONE, MARKER, RAW_OFFSET, Guest, build_guest, read_export
from tests.support.libvirt import Keystore, Libvirtd, available, domain_xml, processes
from usbgate.simulator import FakeDevice, FakeOwner

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


@dataclass
class Env:
    ks: Keystore
    lv: Libvirtd
    guest: Guest
    uuid: str

    def define(self, mode: str, usb_slots: int = 0) -> Path:
        """(Re)define domain web1 booting the guest in `mode`; returns its console log."""
        devices = self.ks.cli("libvirt", "devices", self.ks.vm, "--usb-slots", str(usb_slots))
        console = self.ks.base / "console.log"
        xml = domain_xml(self.ks.vm, self.uuid, self.guest, mode, devices.stdout, console)
        path = self.ks.base / "domain.xml"
        path.write_text(xml)
        self.lv.virsh("define", str(path))
        return console

    def unlock(self, duration: str = "5m") -> None:
        self.ks.cli("vm", "unlock", self.ks.vm, "--for", duration, "--password-file",
                    str(self.ks.pwfile))  # fmt: skip

    def left_behind(self) -> list[str]:
        """What of this test still runs: the host disk server's exports ("export NAME"; the
        server itself stays, serving the host's other VMs), other nbdkit or usbgate
        processes."""
        host = HostFiles(self.ks.run_dir)
        server = hostdisk.ping(host)
        out = [f"export {name}" for name in (hostdisk.exports(host) or {})]
        for pid in processes(str(self.ks.base)):
            if pid == server:
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(os.path.basename(a) in (b"nbdkit", b"usbgate") for a in argv[:2]):
                out.append(b" ".join(argv).decode(errors="replace"))
        return out


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    base = Path(tempfile.mkdtemp(prefix="vlv", dir="/tmp"))
    ks = Keystore(base)
    uuid = ks.create()
    lv = Libvirtd(base / "libvirt")
    lv.prepare()
    ks.install_hook(lv.hooks_dir)  # before the daemon starts: new hook files need a restart
    guest = build_guest()
    try:
        lv.start()
        yield Env(ks, lv, guest, uuid)
    finally:
        unlock.consume(uuid)
        if lv.proc is not None:
            lv.destroy_all()
        lv.stop()
        for pid in processes(str(base)):
            os.kill(pid, 15)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def domain(env: Env) -> Iterator[Env]:
    """Each test leaves web1 shut off and nothing of it running."""
    yield env
    env.lv.virsh("destroy", env.ks.vm, check=False)
    env.lv.wait_state(env.ks.vm, "shut off", 30)


def refused(env: Env) -> str:
    p = env.lv.virsh("start", env.ks.vm, check=False)
    assert p.returncode != 0, "virsh start should have failed"
    assert env.lv.state(env.ks.vm) == "shut off"
    assert env.left_behind() == []
    return p.stderr


def test_start_without_unlock_fails_with_the_hooks_reason(domain: Env) -> None:
    domain.define("write", usb_slots=1)
    err = refused(domain)
    lines = [line for line in err.splitlines() if "vmshield:" in line]
    assert len(lines) == 1 and lines[0].endswith(
        "vmshield: unlock VM web1 first: `vmshield vm unlock web1` "
        "(or `vmshield disk enroll-host web1-0` for unattended starts)"
    )
    # libvirt runs `release end` after a failed prepare: nothing was there to stop
    last = domain.ks.audit(2)
    assert [r["action"] for r in last] == ["libvirt.prepare.refused", "libvirt.release"]
    assert {k: last[1]["detail"][k] for k in ("domain", "disks", "usbgate")} == {  # type: ignore[index]
        "domain": "web1",
        "disks": [],
        "usbgate": False,
    }


def test_unlock_expires(domain: Env) -> None:
    domain.define("write")
    domain.unlock("1s")
    time.sleep(2.2)  # the kernel drops the key after its timeout
    assert "unlock VM web1 first" in refused(domain)


def test_virsh_start_boots_the_guest_on_the_encrypted_disk(domain: Env) -> None:
    ks, lv = domain.ks, domain.lv
    console = domain.define("write", usb_slots=1)
    domain.unlock()
    lv.virsh("start", ks.vm)
    assert domain.left_behind(), "the hook started nothing"
    assert lv.wait_state(ks.vm, "shut off", 120), console.read_text(errors="replace")[-2000:]
    assert f"{DONE} mode=write" in console.read_text(errors="replace")
    # the guest powered off: libvirt ran `release end`, the hook stopped disk and gate
    deadline = time.monotonic() + 10
    while domain.left_behind() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert domain.left_behind() == []
    actions = [r["action"] for r in ks.audit(8)]
    assert "libvirt.prepare" in actions and "libvirt.release" in actions

    image = ks.base / "disks" / "web1-0.img"
    data = image.read_bytes()
    offset, length = payload_region(str(image))
    assert MARKER not in data
    assert MARKER[:16] not in data[offset : offset + length]
    sock = ks.base / "ro.sock"
    ks.cli("disk", "serve", ks.disk, "--readonly", "--socket", str(sock),
           "--password-file", str(ks.pwfile))  # fmt: skip
    try:
        plain = read_export(str(sock))
    finally:
        ks.cli("disk", "stop", ks.disk)
    assert plain[RAW_OFFSET : RAW_OFFSET + len(MARKER)] == MARKER
    assert MARKER + b"\n" in plain

    # the unlock was one start: the next one needs a new unlock
    assert "unlock VM web1 first" in refused(domain)


def test_enroll_host_starts_unattended_until_unenrolled(domain: Env) -> None:
    ks, lv = domain.ks, domain.lv
    domain.define("shell", usb_slots=1)
    ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile))
    try:
        lv.virsh("start", ks.vm)
        assert lv.state(ks.vm) == "running"
        assert len(domain.left_behind()) == 2  # the disk's export + usbgate
        lv.virsh("destroy", ks.vm)
        assert domain.left_behind() == []
        assert ks.audit(1)[-1]["action"] == "libvirt.release"
    finally:
        ks.cli("disk", "unenroll-host", ks.disk)
    assert "unlock VM web1 first" in refused(domain)


def _attached(lv: Libvirtd, vm: str) -> bool:
    cmd = {"execute": "qom-get",
           "arguments": {"path": "/machine/peripheral/redir0", "property": "attached"}}  # fmt: skip
    out = lv.virsh("qemu-monitor-command", vm, json.dumps(cmd)).stdout
    return bool(json.loads(out)["return"])


async def _wait_attached(lv: Libvirtd, vm: str, want: bool, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(_attached, lv, vm) == want:
            return True
        await asyncio.sleep(0.05)
    return False


def test_usb_stick_attaches_through_usbgate_and_a_rule_change_detaches_it(domain: Env) -> None:
    ks, lv = domain.ks, domain.lv
    ks.cli("usb", "allow", ks.vm, "0781:5567")
    domain.define("shell", usb_slots=1)
    domain.unlock()
    lv.virsh("start", ks.vm)
    owner_sock = f"unix:{ks.run_dir / 'web1-usb.sock'}"

    async def scenario() -> FakeOwner:
        owner = await FakeOwner.connect(owner_sock, FakeDevice())
        try:
            assert await _wait_attached(lv, ks.vm, True, 15), "the allowed stick never attached"
            await asyncio.to_thread(ks.cli, "usb", "block", ks.vm, "0781:5567", "--position", "1")
            assert await _wait_attached(lv, ks.vm, False, 5), "the blocked stick stayed attached"
            await asyncio.wait_for(owner.closed.wait(), 5)
        finally:
            await owner.close()
        return owner

    try:
        owner = asyncio.run(scenario())
        assert owner.filter_rejected.is_set()
        actions = [r["action"] for r in ks.audit(10)]
        assert "usb.allowed" in actions and "usb.revoked" in actions
    finally:
        ks.cli("usb", "remove", ks.vm, "1")
        ks.cli("usb", "remove", ks.vm, "1")
    lv.virsh("destroy", ks.vm)
    assert domain.left_behind() == []


def test_libvirtd_restart_keeps_disks_and_gate(domain: Env) -> None:
    ks, lv = domain.ks, domain.lv
    domain.define("shell", usb_slots=1)
    domain.unlock()
    lv.virsh("start", ks.vm)
    before = sorted(domain.left_behind())
    assert len(before) == 2
    lv.restart()
    assert lv.state(ks.vm) == "running"
    assert sorted(domain.left_behind()) == before
    # libvirtd reconnects to its domains in a thread of their own: the hook may run after
    # the daemon already answers virsh
    deadline = time.monotonic() + 30
    while not (recs := [r for r in ks.audit(5) if r["action"] == "libvirt.reconnect"]):
        assert time.monotonic() < deadline, "the hook never reported the reconnect"
        time.sleep(0.1)
    rec = recs[-1]
    detail = rec["detail"]
    assert isinstance(detail, dict)
    assert (detail["up"], detail["missing"]) == (["web1-0", "usbgate"], [])
    lv.virsh("destroy", ks.vm)
    assert domain.left_behind() == []


def test_disk_snapshot_overlay_still_stops_the_server(domain: Env) -> None:
    """An external snapshot puts a (plaintext) qcow2 overlay above the NBD disk; the release
    must still find the disk below it (<backingStore>) and stop its server."""
    ks, lv = domain.ks, domain.lv
    domain.define("shell")
    domain.unlock()
    lv.virsh("start", ks.vm)
    overlay = ks.base / "overlay.qcow2"
    lv.virsh("snapshot-create-as", ks.vm, "s1", "--disk-only", "--no-metadata",
             "--diskspec", f"vda,file={overlay}")  # fmt: skip
    assert overlay.exists()
    lv.virsh("destroy", ks.vm)
    assert domain.left_behind() == []
    overlay.unlink()


@pytest.mark.slow
def test_a_running_domains_disk_is_shown_and_cannot_be_stopped_or_destroyed(domain: Env) -> None:
    """Issue 26 item 2: `disk stop` and `disk destroy` acted on a running guest's disk."""
    ks, lv = domain.ks, domain.lv
    domain.define("shell")
    domain.unlock()
    lv.virsh("start", ks.vm)
    assert lv.state(ks.vm) == "running"
    [served] = json.loads(ks.cli("status", "--json").stdout)["disks"]
    assert served["disk"] == ks.disk and served["started_by"] == "libvirt hook", served
    [client] = served["clients"]
    assert client["command"].startswith("qemu-system-x86_64 "), client
    said = ks.cli("disk", "stop", ks.disk, code=75).stderr
    assert f"NBD client pid {client['pid']}: qemu-system-x86_64" in said, said
    assert f"libvirt domain web1 (pid {client['pid']}: " in said, said
    assert "started through the qemu hook" in said and "--force" in said, said
    ks.cli("disk", "stop", ks.disk, "--force")  # the guest keeps running, without its disk
    said = ks.cli("disk", "destroy", ks.disk, "-m", "zero", "--yes", code=75).stderr
    # the host server keeps a forcibly removed export's image open until its last client
    # (the running QEMU) goes, so the image is still held; a server of its own would be
    # gone and the running domain named instead
    assert "is being served" in said and "nbdkit -U " in said and "nbd.sock" in said, said
    assert json.loads(ks.cli("disk", "list", "--json").stdout)[0]["state"] == "ready"
    lv.virsh("destroy", ks.vm)
    assert domain.left_behind() == []


def test_two_domains_share_one_host_disk_server(domain: Env) -> None:
    """Issue 22: `virsh start` of two domains: one host nbdkit serves both VMs' disks, each
    QEMU the only client of its own VM's export; destroying one leaves the other's alone."""
    ks, lv = domain.ks, domain.lv
    pw = str(ks.pwfile)
    ks.cli("vm", "add", "web2", "--owner", "alice")
    ks.cli("disk", "create", "web2", "--size", "64M", "--pbkdf-iterations", "1000",
           "--password-file", pw)  # fmt: skip
    uuid2 = json.loads(ks.cli("vm", "show", "web2", "--json").stdout)["vm"]["uuid"]
    for disk in (ks.disk, "web2-0"):
        ks.cli("disk", "enroll-host", disk, "--password-file", pw)
    domain.define("shell")
    devices = ks.cli("libvirt", "devices", "web2", "--usb-slots", "0").stdout
    path = ks.base / "web2.xml"
    path.write_text(domain_xml("web2", uuid2, domain.guest, "shell", devices,
                               ks.base / "web2.log"))  # fmt: skip
    lv.virsh("define", str(path))
    host = HostFiles(ks.run_dir)
    try:
        lv.virsh("start", ks.vm)
        lv.virsh("start", "web2")
        exports = hostdisk.exports(host) or {}
        assert set(exports) == {"web1-0", "web2-0"}
        pid = hostdisk.ping(host)
        served = json.loads(ks.cli("status", "--json").stdout)["disks"]
        assert {d["pid"] for d in served} == {pid}  # one process for both
        clients = {d["disk"]: [c["command"] for c in d["clients"]] for d in served}
        assert len(clients["web1-0"]) == len(clients["web2-0"]) == 1
        assert "-name guest=web1," in clients["web1-0"][0]  # each export: its domain's QEMU
        assert "-name guest=web2," in clients["web2-0"][0]
        lv.virsh("destroy", "web2")
        assert set(hostdisk.exports(host) or {}) == {"web1-0"} and hostdisk.ping(host) == pid
        assert lv.state(ks.vm) == "running"
    finally:
        lv.virsh("destroy", "web2", check=False)
        lv.virsh("undefine", "web2", check=False)
        for disk in (ks.disk, "web2-0"):
            ks.cli("disk", "unenroll-host", disk, code=None)
