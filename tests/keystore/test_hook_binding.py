"""The qemu hook binds what a domain may reach: never a vmshield image as a file (issue 20
B4), and a VM's disks and unlock only to the domain named after it (issue 20 C)."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystore.services.libvirt_hook import main
from keystore.services.store import Keystore as Store
from tests.support.libvirt import Keystore, hook_keystore, processes

pytestmark = pytest.mark.skipif(shutil.which("keyctl") is None, reason="keyutils missing")


@pytest.fixture
def ks() -> Iterator[Keystore]:
    with hook_keystore("vhb") as k:
        yield k


def hook(ks: Keystore, op: str, xml: bytes, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    sub = "end" if op == "release" else "begin"
    code = main([ks.vm, op, sub, "-"], config=ks.config, stdin=io.BytesIO(xml))
    return code, capsys.readouterr().err


def file_domain(name: str, path: Path, kind: str = "file") -> bytes:
    attr = "dev" if kind == "block" else "file"
    return (
        f"<domain type='qemu'><name>{name}</name><devices><disk type='{kind}' device='disk'>"
        f"<driver name='qemu' type='raw'/><source {attr}='{path}'/><target dev='vda'/>"
        f"</disk></devices></domain>"
    ).encode()


def image_of(ks: Keystore) -> Path:
    return Path(Store(ks.db).run(lambda r: r.get_disk(ks.disk)).path)


def test_a_vmshield_image_named_as_a_file_is_refused(
    ks: Keystore, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    img = image_of(ks)
    alias = tmp_path / "alias.img"
    alias.symlink_to(img)
    hard = img.parent / "hard.img"
    os.link(img, hard)
    for path in (img, alias, hard, Path(str(img.parent) + "/./" + img.name)):
        code, err = hook(ks, "prepare", file_domain("thief", path), capsys)
        assert code == 1 and err.count("\n") == 1, err
        assert f"ciphertext of vmshield disk {ks.disk}" in err
    row = ks.audit(1)[-1]
    assert row["action"] == "libvirt.prepare.refused" and row["vm"] == ks.vm
    assert processes(str(ks.base)) == []


def test_an_unrelated_file_disk_passes_untouched(
    ks: Keystore, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 4096)
    assert hook(ks, "prepare", file_domain("other", other), capsys) == (0, "")


def test_a_domain_of_another_name_with_the_vms_uuid_gets_nothing(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    """A domain `evil` carrying VM web1's uuid was mapped to web1 by that uuid: it got
    web1's disks served and used up the owner's unlock."""
    import json

    from keystore.services import unlock

    uuid = json.loads(ks.cli("vm", "show", ks.vm, "--json").stdout)["vm"]["uuid"]
    ks.cli("vm", "unlock", ks.vm, "--for", "1m", "--password-file", str(ks.pwfile))
    dev = ks.cli("libvirt", "devices", ks.vm).stdout
    evil = f"<domain><name>evil</name><uuid>{uuid}</uuid><devices>{dev}</devices></domain>"
    code, err = hook(ks, "prepare", evil.encode(), capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert "carries the uuid of VM web1 but not its name" in err
    assert processes(str(ks.base)) == []  # nothing served
    assert unlock.remaining(uuid)  # the owner's unlock is still there, for web1
    row = ks.audit(1)[-1]
    assert row["action"] == "libvirt.prepare.refused" and row["vm"] == ks.vm
    # the domain named after the VM (its uuid too) still starts
    web1 = f"<domain><name>web1</name><uuid>{uuid}</uuid><devices>{dev}</devices></domain>"
    assert hook(ks, "prepare", web1.encode(), capsys)[0] == 0
    assert hook(ks, "release", web1.encode(), capsys)[0] == 0
