"""`vmshield disk import` and `vmshield user remove` through the real command (issue 26
item 14): a lost keystore is rebuilt and its images re-registered; what must not be imported
is refused in one line, with nothing recorded; a user who owns a VM stays."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from keystore.cli import main
from keystore.sqlite import repository as sqlite_repo
from tests.keystore.test_cli_disk_serve import PW, cli
from tests.support.cli import FAST
from tests.support.luks2 import PBKDF2, luks2_format, opens
from tests.support.nbd import read_at, serve_plugin, sha256, write_at

MARKER = b"vmshield-import-marker" * 300


def vms(db: Path, *args: str, secret: bytes | None = None, code: int = 0) -> Result:
    r = CliRunner().invoke(
        main, list(args), input=secret, env={"VMSHIELD_DB": str(db)}, catch_exceptions=False
    )
    assert r.exit_code == code, r.output
    return r


def disks(db: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(vms(db, "disk", "list", "--json").output)
    return out


def fresh_keystore(db: Path) -> None:
    vms(db, "init")
    vms(db, "user", "add", "alice", secret=PW + b"\n")
    vms(db, "vm", "add", "web1", "--owner", "alice")


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    path = tmp_path / "ks.db"
    fresh_keystore(path)
    return path


@pytest.fixture
def stop_all(db: Path) -> Iterator[None]:
    yield
    for d in disks(db):
        if d["server"] and d["server"]["alive"]:
            cli(db, "disk", "stop", d["name"])


def serve(db: Path, sockdir: Path, disk: str) -> str:
    sock = str(sockdir / f"{disk}.sock")
    cli(db, "disk", "serve", disk, "--socket", sock, "--json", secret=PW + b"\n")
    return sock


def test_import_after_the_keystore_is_lost(db: Path, sockdir: Path, stop_all: None) -> None:
    """A vmshield-made disk, its keystore deleted: a new keystore imports the image as it
    was recorded (format, cipher, size, identity), serves it, and the plaintext is there."""
    vms(db, "disk", "create", "web1", "--size", "8M", "--pbkdf-iterations", "1000",
        secret=PW + b"\n")  # fmt: skip
    (before,) = disks(db)
    image = Path(before["path"])
    write_at(serve(db, sockdir, "web1-0"), MARKER, 3 << 20)
    cli(db, "disk", "stop", "web1-0")

    db.unlink()  # the keystore is lost; the image (disks/ next to it) is not
    fresh_keystore(db)
    r = vms(db, "disk", "import", str(image), "--vm", "web1", secret=PW + b"\n")
    assert "disk web1-0 imported" in r.output, r.output
    (after,) = disks(db)
    for key in ("name", "vm", "path", "format", "cipher", "size", "luks_uuid", "st_dev", "st_ino"):
        assert after[key] == before[key], key
    assert after["state"] == "ready"
    audit = json.loads(vms(db, "audit", "--json").output)
    imported = [a for a in audit if a["action"] == "disk.import"]
    assert len(imported) == 1 and imported[0]["detail"]["luks_uuid"] == before["luks_uuid"]

    assert read_at(serve(db, sockdir, "web1-0"), len(MARKER), 3 << 20) == MARKER


def test_import_a_cryptsetup_luks2_image(db: Path, tmp_path: Path) -> None:
    """An image cryptsetup made with the owner's password is recorded as cryptsetup made
    it; the image is not written to."""
    image = tmp_path / "cs.img"
    keyfile = tmp_path / "key"
    keyfile.write_bytes(PW)
    luks2_format(image, keyfile, 4 << 20, *PBKDF2)
    digest = sha256(image)
    vms(db, "disk", "import", str(image), "--vm", "web1", "--name", "data",
        secret=PW + b"\n")  # fmt: skip
    (d,) = disks(db)
    assert (d["name"], d["format"], d["cipher"], d["size"], d["state"]) == (
        "data", "luks2", "aes-xts-plain64", 4 << 20, "ready",
    )  # fmt: skip
    assert d["path"] == str(image) and d["luks_uuid"]
    assert sha256(image) == digest and opens(image, keyfile)


def refused(db: Path, *args: str, secret: bytes = PW, code: int = 1) -> str:
    r = vms(db, "disk", "import", *args, secret=secret + b"\n", code=code)
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 2, r.output
    return r.output


def test_import_refusals_record_nothing(db: Path, tmp_path: Path, sockdir: Path) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_bytes(b"not-the-owners-password")
    other = tmp_path / "other.img"  # a LUKS2 image whose passphrase is not alice's
    luks2_format(other, keyfile, 1 << 20, *PBKDF2)
    out = refused(db, str(other), "--vm", "web1")
    assert "no keyslot" in out and "alice" in out

    keyfile.write_bytes(PW)
    good = tmp_path / "good.img"
    luks2_format(good, keyfile, 1 << 20, *PBKDF2)
    out = refused(db, str(good), "--vm", "web1", secret=b"wrong-password-123", code=77)
    assert "authentication failed" in out.lower(), out

    plain = tmp_path / "plain.img"
    plain.write_bytes(os.urandom(1 << 20))
    assert "not a LUKS image" in refused(db, str(plain), "--vm", "web1")
    assert "No such file" in refused(db, str(tmp_path / "missing.img"), "--vm", "web1")
    with serve_plugin(good, keyfile, sockdir):  # served by hand, outside vmshield
        out = refused(db, str(good), "--vm", "web1")
        assert "is in use by pid" in out and "nbdkit" in out, out
    assert disks(db) == []

    vms(db, "disk", "import", str(good), "--vm", "web1", secret=PW + b"\n")
    out = refused(db, str(good), "--vm", "web1")
    assert "already disk web1-0" in out, out
    copy = tmp_path / "copy.img"
    shutil.copyfile(good, copy)
    out = refused(db, str(copy), "--vm", "web1")
    assert "already recorded as disk web1-0" in out, out
    assert [d["path"] for d in disks(db)] == [str(good)]


def test_user_remove_refused_while_owning_a_vm(db: Path) -> None:
    vms(db, "vm", "add", "web2", "--owner", "alice")
    r = vms(db, "user", "remove", "alice", "--yes", code=1)
    assert "alice" in r.output and "web1, web2" in r.output and "Traceback" not in r.output
    assert [u["name"] for u in json.loads(vms(db, "user", "list", "--json").output)] == ["alice"]
    vms(db, "vm", "remove", "web1", "--yes")
    vms(db, "vm", "remove", "web2", "--yes")
    assert "user alice removed" in vms(db, "user", "remove", "alice", "--yes").output
    assert json.loads(vms(db, "user", "list", "--json").output) == []
    audit = json.loads(vms(db, "audit", "--json").output)
    assert any(a["action"] == "user.remove" and a["detail"]["user"] == "alice" for a in audit)
    vms(db, "user", "add", "alice", secret=PW + b"\n")  # the name is free again
