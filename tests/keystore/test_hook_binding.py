"""The qemu hook binds what a domain may reach: never a vmshield image as a file (issue 20 B4)."""

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
