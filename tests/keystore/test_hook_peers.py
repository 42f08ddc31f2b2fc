"""#20 B2/B3: a server the qemu hook starts opens only its domain's QEMU.

libvirt runs no hook on `virsh attach-device`, and the hook does not recognise a socket
named through an alias; either way another VM's QEMU (or any process) reached the
plaintext. Here the hook serves VM web1's disk, then the attackers connect directly: a plain
nbdinfo, a QEMU of another VM through an alias of the socket path, and web1's own QEMU.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystore.services import nbdproc
from keystore.services.libvirt_hook import main
from tests.support.libvirt import Keystore, hook_keystore
from tests.support.nbd import qemu_client

pytestmark = pytest.mark.skipif(shutil.which("keyctl") is None, reason="keyutils missing")

OTHER = "0b0e5f1c-7a1d-4c2e-9e4b-0000000000aa"


@pytest.fixture
def served(capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[Keystore, Path, str]]:
    """web1's disk served by the hook for domain web1 (host key: unattended); its socket and
    the VM's uuid."""
    with hook_keystore("vhp") as ks:
        ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile))
        uuid = json.loads(ks.cli("vm", "show", ks.vm, "--json").stdout)["vm"]["uuid"]
        dev = ks.cli("libvirt", "devices", ks.vm, "--isolated").stdout  # a server of its own
        xml = (
            f"<domain type='qemu'><name>{ks.vm}</name><uuid>{uuid}</uuid>"
            f"<devices>{dev}</devices></domain>"
        ).encode()
        assert main([ks.vm, "prepare", "begin", "-"], config=ks.config, stdin=io.BytesIO(xml)) == 0
        capsys.readouterr()
        try:
            yield ks, ks.run_dir / f"{ks.disk}.sock", uuid
        finally:
            main([ks.vm, "release", "end", "-"], config=ks.config, stdin=io.BytesIO(xml))


def nbd_domain(name: str, uuid: str, sock: Path) -> bytes:
    return (
        f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><devices>"
        f"<disk type='network' device='disk'><source protocol='nbd'>"
        f"<host transport='unix' socket='{sock}'/></source><target dev='vda'/></disk>"
        "</devices></domain>"
    ).encode()


def log(sock: Path) -> str:
    return sock.with_suffix(".log").read_text(errors="replace")


def refused(sock: Path, pid: int) -> str:
    lines = [ln for ln in log(sock).splitlines() if f"refused a client: pid {pid} " in ln]
    return lines[0] if lines else ""


def test_hook_started_server_refuses_any_other_client(
    served: tuple[Keystore, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    ks, sock, uuid = served
    r = subprocess.Popen(
        ["nbdinfo", f"nbd+unix:///?socket={sock}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, _ = r.communicate(timeout=30)
    assert r.returncode != 0 and "export-size" not in out
    assert f"(nbdinfo) carries no -uuid, not VM {uuid}'s QEMU" in refused(sock, r.pid)

    # another VM's QEMU reaching the socket through a symlinked directory, as a hotplug
    # (`virsh attach-device`: no hook runs) would: refused by the server itself
    alias_dir = ks.base / "alias"
    alias_dir.symlink_to(ks.run_dir)
    alias = alias_dir / sock.name
    with qemu_client(str(alias), OTHER) as other:
        assert other.wait(timeout=60) != 0
        assert f"carries -uuid {OTHER}, not VM {uuid}'s QEMU" in refused(sock, other.pid)
    assert "connected (" not in log(sock)

    # the domain's own QEMU (what libvirt starts: -uuid of the domain) opens the disk
    with qemu_client(str(sock), uuid) as own:
        deadline = time.monotonic() + 30
        while "connected (read-write)" not in log(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "client #1 connected (read-write)" in log(sock)
        assert own.poll() is None and not refused(sock, own.pid)
    assert os.path.exists(sock)


def test_disk_serve_bind_vm_opens_only_the_vms_qemu() -> None:
    with hook_keystore("vhb") as ks:
        uuid = json.loads(ks.cli("vm", "show", ks.vm, "--json").stdout)["vm"]["uuid"]
        sock = ks.base / "b.sock"
        out = ks.cli("disk", "serve", ks.disk, "--socket", str(sock), "--bind-vm",
                     "--password-file", str(ks.pwfile), "--json").stdout  # fmt: skip
        assert json.loads(out)["bound_to_vm"] == uuid
        try:
            r = subprocess.run(["nbdinfo", f"nbd+unix:///?socket={sock}"], capture_output=True)
            assert r.returncode != 0
            assert "carries no -uuid" in log(sock)
            with qemu_client(str(sock), uuid) as own:
                deadline = time.monotonic() + 30
                while "connected (read-write)" not in log(sock) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert own.poll() is None and "client #1 connected (read-write)" in log(sock)
        finally:
            ks.cli("disk", "stop", ks.disk, "--force")


def test_hook_sees_a_socket_by_any_name(
    served: tuple[Keystore, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A domain naming a served socket through `..` or a symlinked directory (as
    `/var/run/vmshield` names `/run/vmshield`) is a vmshield domain for the hook: another
    VM's is refused at start."""
    ks, sock, _ = served
    (ks.base / "alias").symlink_to(ks.run_dir)
    for alias in (ks.run_dir / ".." / "run" / sock.name, ks.base / "alias" / sock.name):
        xml = nbd_domain("other", OTHER, alias)
        code = main(["other", "prepare", "begin", "-"], config=ks.config, stdin=io.BytesIO(xml))
        err = capsys.readouterr().err
        assert code == 1, alias
        assert "domain other uses vmshield sockets but no VM" in err


def test_own_domain_through_an_alias_is_served(capsys: pytest.CaptureFixture[str]) -> None:
    with hook_keystore("vha") as ks:
        ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile))
        uuid = json.loads(ks.cli("vm", "show", ks.vm, "--json").stdout)["vm"]["uuid"]
        alias = ks.run_dir / ".." / "run" / f"{ks.disk}.sock"
        xml = nbd_domain(ks.vm, uuid, alias)
        assert main([ks.vm, "prepare", "begin", "-"], config=ks.config, stdin=io.BytesIO(xml)) == 0
        assert f"served {ks.disk}" in capsys.readouterr().err
        assert nbdproc.probe(ks.run_dir / f"{ks.disk}.sock")
        assert main([ks.vm, "release", "end", "-"], config=ks.config, stdin=io.BytesIO(xml)) == 0
        # the release finds the server through the same alias
        assert f"stopped {ks.disk}" in capsys.readouterr().err
        assert not nbdproc.probe(ks.run_dir / f"{ks.disk}.sock")
