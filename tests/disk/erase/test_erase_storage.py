"""The storage assessment: what an overwrite can reach, and the NIST SP 800-88 category."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from nbd_plugin.erase.storage import _in_place, assess_path, filesystem_type, nist_category


def _info(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kind": "file",
        "filesystem": "ext4",
        "copy_on_write": False,
        "shared_extents": False,
        "rotational": True,
        "thin": False,
    }
    return base | kw


@pytest.mark.parametrize(
    ("info", "in_place"),
    [
        (_info(), True),
        (_info(filesystem="btrfs", copy_on_write=True), False),
        (_info(filesystem="xfs", shared_extents=True), False),  # reflinked extents
        (_info(rotational=False), False),  # SSD: the FTL remaps writes
        (_info(filesystem="nfs"), None),
        (_info(filesystem="0x1234abcd"), None),  # unknown filesystem
        (_info(kind="block device", filesystem=None, thin=True), None),  # dm-thin
        (
            _info(kind="block device", filesystem=None, backing=_info(overwrite_in_place=False)),
            False,
        ),  # loop over a file on btrfs
    ],
)
def test_overwrite_in_place(info: dict[str, Any], in_place: bool | None) -> None:
    notes: list[str] = []
    assert _in_place(info, notes) is in_place


@pytest.mark.parametrize(
    ("in_place", "crypto", "overwritten", "category"),
    [
        (True, True, True, "Purge"),
        (False, True, True, "Purge"),
        (None, True, False, "Purge"),
        (True, False, True, "Clear"),
        (False, False, True, "not assured"),
        (None, False, True, "not assured"),
    ],
)
def test_nist_category(
    in_place: bool | None, crypto: bool, overwritten: bool, category: str
) -> None:
    result = nist_category({"overwrite_in_place": in_place}, crypto, overwritten)
    assert result["category"] == category
    if crypto and in_place is not True:
        assert any("earlier copies" in c for c in result["caveats"])


def test_filesystem_type_matches_stat(tmp_path: Path) -> None:
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert filesystem_type(str(tmp_path)) == {"ext2/ext3": "ext4"}.get(fs, fs)
    assert filesystem_type("/proc") != "ext4"


def test_sparse_file_counts_as_thin(tmp_path: Path) -> None:
    f = tmp_path / "sparse"
    with open(f, "wb") as out:
        out.truncate(1 << 30)
        out.write(b"x")
    info = assess_path(str(f))
    assert info["sparse_file"] is True and info["thin"] is True
    rot = Path(f"/sys/block/{info['device']}/queue/rotational") if info["device"] else None
    if rot is not None and rot.exists():
        assert info["rotational"] == (rot.read_text().strip() == "1")
