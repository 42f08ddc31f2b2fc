"""One policy for new secrets and new images (issue 26 item 8): `user add`, `image create`
and `disk create` refuse the same short secrets with the same minimum, make the same format
with the same KDF, and their help says which format QEMU's own luks driver opens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from keystore.cli import main
from keystore.secretpolicy import MIN_LENGTH
from keystore.sqlite import repository as sqlite_repo
from tests.support.cli import FAST, PW

#: a cheap argon2id keyslot (the default KDF) for a test image
CHEAP_ARGON2 = ("--iter-time", "50")


def vms(*args: str, input: str | None = None, code: int = 0) -> Result:
    r = CliRunner().invoke(main, list(args), input=input)
    assert r.exit_code == code, r.output
    return r


@pytest.fixture
def ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMSHIELD_DB", str(tmp_path / "ks.db"))
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    vms("init")
    return tmp_path


def _image_create(path: Path, secret: bytes, *extra: str, code: int = 0) -> Result:
    key = path.with_suffix(".key")
    key.write_bytes(secret)
    return vms(
        "image", "create", str(path), "--size", "1M", "--passphrase-file", str(key), *extra,
        code=code,
    )  # fmt: skip


def test_the_same_minimum_everywhere(ready: Path) -> None:
    short, enough = "s" * (MIN_LENGTH - 1), "s" * MIN_LENGTH
    said = f"too short: use at least {MIN_LENGTH} characters"
    assert said in vms("user", "add", "alice", input=short + "\n", code=1).output
    assert said in _image_create(ready / "a.img", short.encode(), code=1).output
    assert not (ready / "a.img").exists()
    vms("user", "add", "alice", input=enough + "\n")
    _image_create(ready / "a.img", enough.encode(), *CHEAP_ARGON2)
    vms("vm", "add", "web1", "--owner", "alice")
    # disk create writes the owner's password, which the policy let in at `user add`
    vms("disk", "create", "web1", "--size", "1M", *CHEAP_ARGON2, input=enough + "\n")


def test_image_create_and_disk_create_make_the_same_image(ready: Path) -> None:
    vms("user", "add", "alice", input=PW + "\n")
    vms("vm", "add", "web1", "--owner", "alice")
    vms("disk", "create", "web1", "--size", "1M", *CHEAP_ARGON2, input=PW + "\n")
    loose = ready / "loose.img"
    _image_create(loose, PW.encode(), *CHEAP_ARGON2)
    disk = ready / "disks" / "web1-0.img"
    infos = [json.loads(vms("image", "info", str(p), "--json").output) for p in (disk, loose)]
    for info in infos:
        (slot,) = [s for s in info["keyslots"] if s.get("active")]
        assert (info["format"], info["cipher"], slot["kdf"]) == (
            "luks2", "aes-xts-plain64", "argon2id",
        ), info  # fmt: skip


@pytest.mark.parametrize("command", [["image", "create"], ["disk", "create"]])
def test_help_says_which_format_qemu_opens(command: list[str]) -> None:
    text = " ".join(vms(*command, "--help").output.split())
    assert "QEMU's own luks driver" in text and "open LUKS1 only" in text
    assert "[default: luks2]" in text


@pytest.mark.parametrize("command", ["add-key", "passwd"])
def test_image_add_key_and_passwd_apply_the_same_minimum(tmp_path: Path, command: str) -> None:
    """A passphrase an image gets later passes the same policy as one it is created with:
    refused in one line before the image is touched, accepted at the minimum."""
    image = tmp_path / "a.img"
    _image_create(image, PW.encode(), *CHEAP_ARGON2)
    before = image.read_bytes()
    old = tmp_path / "old.key"
    old.write_bytes(PW.encode())
    new = tmp_path / "new.key"
    new.write_bytes(b"s" * (MIN_LENGTH - 1))
    args = ("image", command, str(image), "--passphrase-file", str(old),
            "--new-passphrase-file", str(new), "--iter-time", "50")  # fmt: skip
    r = vms(*args, code=1)
    assert r.output.strip().splitlines() == [
        f"Error: passphrase too short: use at least {MIN_LENGTH} characters"
    ]
    assert image.read_bytes() == before
    new.write_bytes(b"s" * MIN_LENGTH)
    vms(*args)
    vms("image", "test-passphrase", str(image), "--passphrase-file", str(new))
