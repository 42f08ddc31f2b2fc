"""`virsh start` under the test libvirtd with the VM's disk bound to a real Tang server and no
unlock: the hook opens the disk through clevis, the guest boots and writes its marker; with
Tang down the start fails with the hook's one line naming the server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scripts.lab.guest import DONE, MARKER, RAW_OFFSET, read_export
from tests.keystore.test_libvirt import Env, domain, env, refused
from tests.support.libvirt import available
from tests.support.tang import Tang, tang_server

__all__ = ["domain", "env"]  # the libvirtd and guest fixtures, shared with test_libvirt

pytestmark = [
    pytest.mark.skipif(available() is not None, reason=str(available())),
    pytest.mark.slow,
]


@pytest.fixture
def tang(env: Env) -> Iterator[Tang]:
    with tang_server(env.ks.base / "tang") as t:
        yield t


def test_virsh_start_with_a_tang_bound_disk_boots_unattended(
    domain: Env,
    tang: Tang,
) -> None:
    ks, lv = domain.ks, domain.lv
    pw = ("--password-file", str(ks.pwfile))
    out = ks.cli("disk", "bind", ks.disk, "tang", "--url", tang.url, *pw).stdout
    slot = out.split("keyslot ")[1].split()[0]
    try:
        ks.cli("vm", "set", ks.vm, "--unlock", "network")
        console = domain.define("write")
        lv.virsh("start", ks.vm)  # nobody unlocked it
        assert lv.wait_state(ks.vm, "shut off", 120), console.read_text(errors="replace")[-2000:]
        assert f"{DONE} mode=write" in console.read_text(errors="replace")
        prep = [r for r in ks.audit(10) if r["action"] == "libvirt.prepare"][-1]
        assert prep["detail"]["disks"] == {ks.disk: "network"}  # type: ignore[index]
        sock = ks.base / "tang-ro.sock"
        ks.cli("disk", "serve", ks.disk, "--readonly", "--socket", str(sock), *pw)
        try:
            plain = read_export(str(sock))
        finally:
            ks.cli("disk", "stop", ks.disk)
        assert plain[RAW_OFFSET : RAW_OFFSET + len(MARKER)] == MARKER

        tang.stop()
        lines = [line for line in refused(domain).splitlines() if "vmshield:" in line]
        assert len(lines) == 1 and tang.url in lines[0], lines
    finally:
        ks.cli("vm", "set", ks.vm, "--unlock", "any")
        ks.cli("disk", "unbind", ks.disk, "--slot", slot, *pw)
