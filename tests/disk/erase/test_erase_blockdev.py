"""Erase of a block device (a loop device over a test file): whole device, discard ioctls."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_plugin.erase import EraseOptions, erase
from nbd_plugin.errors import ImageBusy, ImageError
from tests.support.erase import MIB, block_digests, expected_pass_bytes, make_luks, opens


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    backing = tmp_path / "backing.img"
    make_luks(backing)
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield backing, dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def _opts(tmp: Path, *, discard: bool = True, secure_discard: bool = False) -> EraseOptions:
    return EraseOptions(
        journal_path=str(tmp / "journal"),
        certificate_path=str(tmp / "cert.json"),
        discard=discard,
        secure_discard=secure_discard,
    )


def test_whole_device_is_overwritten_in_place(loop: tuple[Path, str], tmp_path: Path) -> None:
    backing, dev = loop
    original = block_digests(backing)
    assert opens(backing)
    cert = erase(dev, "random", _opts(tmp_path, discard=False))
    d = cert.data
    assert d["target"]["kind"] == "block device" and d["target"]["size"] == 16 * MIB
    assert d["target"]["allocated_bytes"] == 16 * MIB  # holes of the file do not matter
    assert d["storage"]["thin"] is True and d["storage"]["loop_backing_file"] == str(backing)
    assert d["unlinked"] is False and os.path.exists(dev)
    key = bytes.fromhex(d["keystream"]["erase_key"])
    assert backing.read_bytes() == expected_pass_bytes("random", key, 1, 0, 16 * MIB)
    assert not block_digests(backing) & original
    assert not opens(backing)


def test_zero_pass_on_a_loop_device_writes_instead_of_blkzeroout(
    loop: tuple[Path, str], tmp_path: Path
) -> None:
    # loop turns BLKZEROOUT into fallocate(ZERO_RANGE): old blocks would stay on the medium
    backing, dev = loop
    cert = erase(dev, "zero", _opts(tmp_path))
    assert cert.data["passes"][0]["via"] == "write"
    assert cert.data["discard"] == {"performed": True, "how": "BLKDISCARD", "result": "done"}
    assert backing.read_bytes() == bytes(16 * MIB)


def test_secure_discard_refusal_is_reported(loop: tuple[Path, str], tmp_path: Path) -> None:
    _, dev = loop
    with pytest.raises(ImageError, match="BLKSECDISCARD"):
        erase(dev, "crypto", _opts(tmp_path, secure_discard=True))
    # the overwrite is done; running again without --secure-discard finishes from the journal
    cert = erase(dev, "crypto", _opts(tmp_path))
    assert cert.data["resumed"] == 1 and cert.data["crypto_erase"]["performed"]


def test_a_device_in_use_or_a_file_behind_a_loop_is_refused(
    loop: tuple[Path, str], tmp_path: Path
) -> None:
    backing, dev = loop
    with pytest.raises(ImageBusy, match=f"attached to {dev}"):
        erase(str(backing), "zero", _opts(tmp_path))
    holder = os.open(dev, os.O_RDONLY | os.O_EXCL)  # as a mount or a dm mapping would
    try:
        with pytest.raises(ImageBusy, match="mounted, mapped"):
            erase(dev, "zero", _opts(tmp_path))
    finally:
        os.close(holder)
    assert opens(backing)
