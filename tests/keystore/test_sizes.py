"""Sizes as qemu-img reads them (issue 26 item 7): the same spellings accepted and refused,
the same byte counts, checked against the real `qemu-img create`; what was taken is said;
tables print human sizes and `--bytes` the raw ones."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from keystore.cli import main
from keystore.sizes import human, parse_size
from keystore.sqlite import repository as sqlite_repo
from tests.support.cli import FAST, PW

SPELLINGS = [
    "20G", "1.5g", "512M", "1K", "1t", "1000", "1000b", "0.5k", "1.3k", "1.7k",
    "1.00048828125k", "5.G", "+20G", " 20G", "0x10", "20GB", "20GiB", "20Gi", "1.5", "1.5b",
    "1e3", ".5G", "20 G", "20G ", "-1", "8E",
]  # fmt: skip


def _qemu_img(tmp_path: Path, text: str) -> int | None:
    """The size qemu-img takes `text` for, None if it refuses the spelling."""
    target = tmp_path / "q.img"
    p = subprocess.run(
        ["qemu-img", "create", "-f", "raw", str(target), "--", text],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    target.unlink(missing_ok=True)
    if "Invalid image size" in p.stderr:
        return None
    m = re.search(r"size=(\d+)", p.stdout)
    assert m, (text, p.stdout, p.stderr)
    return int(m.group(1))


@pytest.mark.parametrize("text", SPELLINGS)
def test_parse_size_agrees_with_qemu_img(tmp_path: Path, text: str) -> None:
    expected = _qemu_img(tmp_path, text)
    if expected is None:
        with pytest.raises(ValueError, match=re.escape(repr(text))):
            parse_size(text)
    else:
        assert parse_size(text).nbytes == expected


def test_what_was_taken_is_said() -> None:
    assert parse_size("20G").explain().startswith("20G = 20 GiB (21474836480 bytes;")
    with pytest.raises(ValueError, match="write 20G"):
        parse_size("20GB")
    assert [human(n) for n in (1000, 1536, 20 << 30, 3 << 29, 100 << 40)] == [
        "1000 B", "1.5 KiB", "20 GiB", "1.5 GiB", "100 TiB",
    ]  # fmt: skip


@pytest.fixture
def ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMSHIELD_DB", str(tmp_path / "ks.db"))
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    vms("init")
    vms("user", "add", "alice", input=PW + "\n")
    vms("vm", "add", "web1", "--owner", "alice")
    return tmp_path


def vms(*args: str, input: str | None = None, code: int = 0) -> Result:
    r = CliRunner().invoke(main, list(args), input=input)
    assert r.exit_code == code, r.output
    return r


def test_disk_create_takes_qemu_sizes_and_lists_them_human(ready: Path) -> None:
    fast = ("--pbkdf-iterations", "1000")
    r = vms("disk", "create", "web1", "--size", "20GB", *fast, input=PW + "\n", code=2)
    assert "write 20G" in r.output and "20 GiB" in r.output
    assert not (ready / "disks").exists() or not list((ready / "disks").iterdir())
    assert json.loads(vms("disk", "list", "--json").output) == []
    r = vms("disk", "create", "web1", "--size", "1.5M", *fast, input=PW + "\n")
    assert "1.5M = 1.5 MiB (1572864 bytes" in r.output
    listing = vms("disk", "list").output
    assert "1.5 MiB" in listing and "1572864" not in listing
    assert "1572864" in vms("disk", "list", "--bytes").output
    assert json.loads(vms("disk", "list", "--json").output)[0]["size"] == 1572864
    assert "web1-0  ready  1.5 MiB  luks2" in vms("vm", "show", "web1").output
    assert "1572864 bytes" in vms("vm", "show", "web1", "--bytes").output


def test_image_create_rounds_up_to_whole_sectors_and_says_so(tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    r = vms(
        "image", "create", str(image), "--size", "1.3k", "--format", "luks1",
        "--pbkdf-iterations", "1000", "--passphrase-file", str(_key(tmp_path)),
    )  # fmt: skip
    assert "1331 bytes" in r.output and "rounded up to 1536 bytes" in r.output
    assert json.loads(vms("image", "info", str(image), "--json").output)["size"] == 1536


def _key(tmp_path: Path) -> Path:
    key = tmp_path / "key"
    key.write_bytes(PW.encode())
    return key
