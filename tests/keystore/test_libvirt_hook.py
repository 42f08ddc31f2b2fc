"""The qemu hook without libvirtd: its decisions, run in-process on the XML libvirt would pass,
against a real keystore, real nbdkit servers and the real kernel keyring."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystore.services import hostdisk, nbdproc, unlock
from keystore.services.hookfile import hook_text
from keystore.services.libvirt_hook import main
from keystore.services.nbdproc import HostFiles
from nbd_plugin.serve.hardening import can_lock_memory
from tests.support.libvirt import Keystore, hook_keystore, processes
from tests.support.procs import core_limits, unlimited_core, unlocked_mappings, wait_reading_stdin

pytestmark = pytest.mark.skipif(shutil.which("keyctl") is None, reason="keyutils missing")


@pytest.fixture
def ks() -> Iterator[Keystore]:
    with hook_keystore("vlh") as k:
        yield k


def domain(ks: Keystore, *, disks: list[str] | None = None, usb: int = 0, name: str = "") -> bytes:
    """A domain XML as libvirt passes it: `vmshield libvirt devices` inside <devices>."""
    dev = ks.cli("libvirt", "devices", ks.vm, "--usb-slots", str(usb)).stdout
    if disks is not None:  # replace the disk sockets by the given ones
        root = ET.fromstring(f"<devices>{dev}</devices>")
        for el in root.findall("disk"):
            root.remove(el)
        for sock in disks:
            root.append(ET.fromstring(
                f"<disk type='network' device='disk'><source protocol='nbd'>"
                f"<host transport='unix' socket='{sock}'/></source><target dev='vdz'/></disk>"
            ))  # fmt: skip
        dev = "".join(ET.tostring(el, encoding="unicode") for el in root)
    name = name or ks.vm
    return f"<domain type='qemu'><name>{name}</name><devices>{dev}</devices></domain>".encode()


def left_behind(ks: Keystore) -> list[int]:
    """What the hook left running besides the host disk server, which stays (it serves the
    other VMs) but must serve nothing of this one."""
    host = HostFiles(ks.run_dir)
    pid = hostdisk.ping(host)
    assert pid is None or hostdisk.exports(host) == {}
    return [p for p in processes(str(ks.base)) if p != pid]


def hook(
    ks: Keystore, op: str, sub: str, xml: bytes, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    code = main([ks.vm, op, sub, "-"], config=ks.config, stdin=io.BytesIO(xml))
    return code, capsys.readouterr().err


def test_foreign_domain_passes_untouched(ks: Keystore, capsys: pytest.CaptureFixture[str]) -> None:
    xml = b"<domain type='qemu'><name>other</name><devices/></domain>"
    assert hook(ks, "prepare", "begin", xml, capsys) == (0, "")
    assert not [r for r in ks.audit() if str(r["action"]).startswith("libvirt.")]


def test_live_migration_refused(ks: Keystore, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = hook(ks, "migrate", "begin", domain(ks), capsys)
    assert code == 1
    assert err.count("\n") == 1 and "live migration of VM web1 refused" in err
    assert ks.audit(1)[-1]["action"] == "libvirt.migrate.refused"


def test_prepare_without_unlock_fails_and_starts_nothing(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = hook(ks, "prepare", "begin", domain(ks, usb=1), capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        "vmshield: unlock VM web1 first: `vmshield vm unlock web1` "
        "(or `vmshield disk enroll-host web1-0` for unattended starts)"
    ]
    assert processes(str(ks.base)) == []
    assert ks.audit(1)[-1]["action"] == "libvirt.prepare.refused"


def test_socket_of_another_disk_is_refused(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = domain(ks, disks=[str(ks.run_dir / "db1-0.sock")])
    code, err = hook(ks, "prepare", "begin", xml, capsys)
    assert code == 1 and "which is not a disk of VM web1" in err


def test_failed_second_disk_stops_the_first(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    ks.cli("disk", "create", ks.vm, "--size", "64M", "--pbkdf-iterations", "1000",
           "--password-file", str(ks.pwfile))  # fmt: skip
    (ks.base / "disks" / "web1-1.img").write_bytes(b"not a LUKS image" * 64)
    ks.cli("vm", "unlock", ks.vm, "--for", "1m", "--password-file", str(ks.pwfile))
    code, err = hook(ks, "prepare", "begin", domain(ks, usb=1), capsys)
    assert code == 1 and err.startswith("vmshield: disk web1-1: ")
    assert "not a LUKS image" in err and err.count("\n") == 1
    assert left_behind(ks) == []  # web1-0's export was removed again, no usbgate
    assert [d["server"] for d in json.loads(ks.cli("disk", "list", "--json").stdout)] == [None] * 2
    # the unlock was not used up by the failed start
    assert unlock.remaining(json.loads(ks.cli("vm", "show", ks.vm, "--json").stdout)["vm"]["uuid"])


def test_prepare_release_reconnect(ks: Keystore, capsys: pytest.CaptureFixture[str]) -> None:
    ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile))
    xml = domain(ks, usb=1)
    code, err = hook(ks, "prepare", "begin", xml, capsys)
    assert code == 0
    assert re.fullmatch(
        r"vmshield: VM web1: served web1-0, usbgate with 1 slot\(s\) in \d+\.\d\d s\n", err
    )
    sock = ks.run_dir / "nbd.sock"  # the host disk server's
    assert nbdproc.probe(sock) and "web1-0" in (hostdisk.exports(HostFiles(ks.run_dir)) or {})
    assert (ks.run_dir / "web1-usb.sock").is_socket()  # usbgate listens for owners
    prep = ks.audit(3)[-1]
    assert prep["action"] == "libvirt.prepare"
    assert prep["detail"]["disks"] == {"web1-0": "host-key"}  # type: ignore[index]

    code, err = hook(ks, "reconnect", "begin", xml, capsys)
    assert (code, err) == (0, "vmshield: VM web1: still up: web1-0, usbgate\n")

    code, err = hook(ks, "release", "end", xml, capsys)
    assert (code, err) == (0, "vmshield: VM web1: stopped web1-0, usbgate\n")
    assert left_behind(ks) == []

    code, err = hook(ks, "reconnect", "begin", xml, capsys)
    assert code == 0 and "MISSING: web1-0, usbgate" in err


def test_prepare_and_release_through_a_usbgate_host(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    """hook.conf's usb_host: the VM is added to a running `usbgate host serve` and removed
    from it, instead of a `usbgate run` of its own."""
    control = ks.base / "usbgate.ctl"
    ks.cli("libvirt", "install-hook", "--hooks-dir", str(ks.base / "hooks"), "--config",
           str(ks.config), "--run-dir", str(ks.run_dir), "--host-key", str(ks.host_key),
           "--usb-host", str(control))  # fmt: skip
    assert f"usb_host = {control}" in ks.config.read_text()
    usbgate = str(Path(sys.executable).with_name("usbgate"))
    log = ks.base / "usbgate-host.log"
    with log.open("wb") as out:
        host = subprocess.Popen([usbgate, "host", "serve", "--control", str(control), "--db",
                                 str(ks.db)], stdout=out, stderr=out)  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while b"host listening" not in log.read_bytes():
            assert host.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)

        def served() -> list[str]:
            argv = [usbgate, "host", "list", "--json", "--control", str(control)]
            out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
            return [v["listen"] for v in json.loads(out.stdout)["vms"]]

        ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile))
        xml = domain(ks, usb=1)
        code, err = hook(ks, "prepare", "begin", xml, capsys)
        assert code == 0 and "usbgate with 1 slot(s)" in err, err
        assert served() == [f"unix:{ks.run_dir / 'web1-usb.sock'}"]
        assert (ks.run_dir / "web1-usb.sock").is_socket()
        assert ks.audit(3)[-1]["detail"]["usbgate_pid"] == host.pid  # type: ignore[index]
        code, err = hook(ks, "reconnect", "begin", xml, capsys)
        assert (code, err) == (0, "vmshield: VM web1: still up: web1-0, usbgate\n")
        code, err = hook(ks, "release", "end", xml, capsys)
        assert (code, err) == (0, "vmshield: VM web1: stopped web1-0, usbgate\n")
        assert served() == [] and not (ks.run_dir / "web1-usb.sock").exists()
        assert host.poll() is None  # the host goes on serving (other VMs)
    finally:
        host.terminate()
        host.wait(10)
    # the host gone, a start fails with one line and leaves nothing running
    code, err = hook(ks, "prepare", "begin", xml, capsys)
    assert code == 1 and err.count("\n") == 1 and f"usbgate host {control}" in err, err
    assert left_behind(ks) == []  # the host disk server may stay, serving nothing of web1


def test_unlock_is_one_start(ks: Keystore, capsys: pytest.CaptureFixture[str]) -> None:
    ks.cli("vm", "unlock", ks.vm, "--for", "1m", "--password-file", str(ks.pwfile))
    xml = domain(ks)
    assert hook(ks, "prepare", "begin", xml, capsys)[0] == 0
    assert ks.audit(3)[-1]["detail"]["disks"] == {"web1-0": "unlock"}  # type: ignore[index]
    assert hook(ks, "release", "end", xml, capsys)[0] == 0
    code, err = hook(ks, "prepare", "begin", xml, capsys)
    assert code == 1 and "unlock VM web1 first" in err


def test_wrong_unlock_password_is_refused(ks: Keystore) -> None:
    bad = ks.base / "bad.pw"
    bad.write_bytes(b"wrong password entirely")
    p = ks.cli("vm", "unlock", ks.vm, "--password-file", str(bad), code=77)
    assert p.stderr.strip().count("\n") == 0
    assert ks.audit(1)[-1]["action"] == "auth.fail"


def test_host_key_readable_by_others_is_refused(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile))
    assert ks.host_key.stat().st_mode & 0o777 == 0o600
    os.chmod(ks.host_key, 0o644)
    code, err = hook(ks, "prepare", "begin", domain(ks), capsys)
    assert code == 1 and "must be a regular file owned by uid 0 with mode 0600" in err


def test_enroll_unenroll(ks: Keystore) -> None:
    out = ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile)).stdout
    assert "enrolled on this host (keyslot 1" in out
    again = ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile), code=1)
    assert "already enrolled" in again.stderr
    image = str(ks.base / "disks" / "web1-0.img")
    key = bytes(unlock.read_host_key(ks.host_key) or b"")
    assert unlock.host_key_opens(image, key)
    assert "keyslot 1 removed" in ks.cli("disk", "unenroll-host", ks.disk).stdout
    assert not unlock.host_key_opens(image, key)
    assert "not enrolled" in ks.cli("disk", "unenroll-host", ks.disk, code=1).stderr
    actions = [r["action"] for r in ks.audit(10)]
    assert "disk.enroll_host" in actions and "disk.unenroll_host" in actions


def test_devices_xml(ks: Keystore) -> None:
    ks.cli("usb", "allow", ks.vm, "0781:5567")
    dev = ET.fromstring(
        f"<devices>{ks.cli('libvirt', 'devices', ks.vm, '--usb-slots', '2').stdout}</devices>"
    )
    (disk,) = dev.findall("disk")
    # an export of the host disk server, with QEMU reconnecting if the server restarts
    assert disk.find("source").get("name") == "web1-0"  # type: ignore[union-attr]
    assert disk.find("source/host").get("socket") == str(ks.run_dir / "nbd.sock")  # type: ignore[union-attr]
    assert disk.find("source/reconnect").get("delay") == "10"  # type: ignore[union-attr]
    isolated = ET.fromstring(
        f"<devices>{ks.cli('libvirt', 'devices', ks.vm, '--isolated').stdout}</devices>"
    )
    (own,) = isolated.findall("disk")
    assert own.find("source").get("name") is None  # type: ignore[union-attr]
    assert own.find("source/host").get("socket") == str(ks.run_dir / "web1-0.sock")  # type: ignore[union-attr]
    assert [c.get("model") for c in dev.findall("controller")] == ["qemu-xhci"]
    paths = [r.find("source").get("path") for r in dev.findall("redirdev")]  # type: ignore[union-attr]
    assert paths == [str(ks.run_dir / "web1-usb0.sock"), str(ks.run_dir / "web1-usb1.sock")]
    rules = [
        (u.get("vendor"), u.get("product"), u.get("allow"))
        for u in dev.iterfind("redirfilter/usbdev")
    ]
    assert rules == [("0x0781", "0x5567", "yes"), (None, None, "no")]


def test_install_hook(ks: Keystore) -> None:
    hookfile = ks.base / "hooks" / "vmshield"
    assert os.access(hookfile, os.X_OK)
    assert str(ks.config) in hookfile.read_text()
    assert "libvirtd uses the new version at once" in ks.cli(
        "libvirt", "install-hook", "--hooks-dir", str(ks.base / "hooks")).stdout  # fmt: skip
    other = ks.base / "other"
    other.mkdir()
    (other / "vmshield").write_text("#!/bin/sh\nexit 0\n")
    p = ks.cli("libvirt", "install-hook", "--hooks-dir", str(other), code=1)
    assert "is not vmshield's hook" in p.stderr


def test_config_without_db(ks: Keystore, capsys: pytest.CaptureFixture[str]) -> None:
    xml = domain(ks)
    ks.config.write_text("[vmshield]\nrun_dir = /tmp\n")
    code, err = hook(ks, "prepare", "begin", xml, capsys)
    assert (
        code == 1
        and err == f"vmshield: {ks.config}: db = PATH is required (the keystore database)\n"
    )


def test_disk_below_a_snapshot_overlay_is_found() -> None:
    from keystore.services.libvirt_xml import parse_domain

    xml = b"""<domain><name>web1</name><uuid>ABC</uuid><devices><disk type='file'>
      <source file='/var/lib/ov.qcow2'/>
      <backingStore type='network'><format type='raw'/>
        <source protocol='nbd'><host transport='unix' socket='/run/vmshield/web1-0.sock'/></source>
      </backingStore><target dev='vda'/></disk></devices></domain>"""
    dom = parse_domain(xml)
    assert dom.uuid == "abc"
    assert [d.socket for d in dom.disks] == [Path("/run/vmshield/web1-0.sock")]


def test_usbgate_failure_stops_the_disks(ks: Keystore, capsys: pytest.CaptureFixture[str]) -> None:
    ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile))
    xml = domain(ks, usb=1)
    text = ks.config.read_text().replace(
        "usb_listen = unix:{run_dir}/{vm}-usb.sock", "usb_listen = unix:/nonexistent/{vm}.sock"
    )
    ks.config.write_text(text)
    code, err = hook(ks, "prepare", "begin", xml, capsys)
    assert code == 1 and err.startswith("vmshield: usbgate of VM web1 exited: ")
    assert err.count("\n") == 1
    assert left_behind(ks) == []
    assert [d["server"] for d in json.loads(ks.cli("disk", "list", "--json").stdout)] == [None]


def test_unlock_cancel_and_bad_duration(ks: Keystore, capsys: pytest.CaptureFixture[str]) -> None:
    ks.cli("vm", "unlock", ks.vm, "--for", "10m", "--password-file", str(ks.pwfile))
    assert "unlock withdrawn" in ks.cli("vm", "unlock", ks.vm, "--cancel").stdout
    code, err = hook(ks, "prepare", "begin", domain(ks), capsys)
    assert code == 1 and "unlock VM web1 first" in err
    assert "no pending unlock" in ks.cli("vm", "unlock", ks.vm, "--cancel").stdout
    bad = ks.cli("vm", "unlock", ks.vm, "--for", "25h", "--password-file", str(ks.pwfile), code=2)
    assert "must be between 1 s and 24 h" in bad.stderr


def test_reconnect_restarts_a_dead_host_server_and_restores(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    """libvirtd restarted and the host disk server is gone too (a host-wide hiccup): the
    hook's `reconnect begin` starts a new server and serves the domain's disk again (the host
    key opens it), so its QEMU reconnects; the audit says what came back."""
    import signal
    import time

    ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile))
    xml = domain(ks)
    assert hook(ks, "prepare", "begin", xml, capsys)[0] == 0
    host = HostFiles(ks.run_dir)
    old = hostdisk.ping(host)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    while hostdisk.ping(host) is not None:
        time.sleep(0.02)
    code, err = hook(ks, "reconnect", "begin", xml, capsys)
    assert (code, err) == (0, "vmshield: VM web1: still up: web1-0\n")
    new = hostdisk.ping(host)
    assert new not in (None, old) and set(hostdisk.exports(host) or {}) == {"web1-0"}
    restored = [r for r in ks.audit(10) if r["action"] == "disk.export.restore"]
    assert restored[-1]["detail"]["restored"] == {"web1-0": "host-key"}  # type: ignore[index]
    assert hook(ks, "release", "end", xml, capsys)[0] == 0
    assert left_behind(ks) == []


@pytest.mark.skipif(
    not can_lock_memory(), reason="this root has no CAP_IPC_LOCK (a container): nothing locks"
)
def test_the_installed_hook_cannot_dump_core_and_keeps_its_memory_out_of_swap(
    ks: Keystore, tmp_path: Path
) -> None:
    """The hook file libvirtd runs as root reads the owner's password from the keyring, the
    host key or a clevis token: it hardens itself (libvirt_hook.run) before it reads its
    stdin, as the `vmshield` command and the server do. It was neither: core limits as
    libvirtd's, nothing locked."""
    hookfile = tmp_path / "vmshield"
    hookfile.write_text(hook_text(ks.config))
    hookfile.chmod(0o755)
    proc = subprocess.Popen(
        [str(hookfile), ks.vm, "prepare", "begin", "-"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=unlimited_core,
    )  # fmt: skip
    try:
        wait_reading_stdin(proc)  # the domain XML
        assert core_limits(proc.pid) == ("0", "0")
        assert unlocked_mappings(proc.pid) == []
        xml = b"<domain type='qemu'><name>other</name><devices/></domain>"
        out, err = proc.communicate(xml, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out, err) == (0, b"", b"")
