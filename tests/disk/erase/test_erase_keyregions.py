"""What a crypto-erase wipes: the LUKS readers' key-material regions, checked against
cryptsetup, and the fallback for a header they refuse."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.errors import UnsupportedError
from nbd_plugin.luks.regions import damaged_header_regions
from tests.support.erase import MIB, make_luks

SIZE = 16 * MIB


def _covered(inner: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    return all(any(o <= i and i + n <= o + m for o, m in outer) for i, n in inner)


def test_luks1_wipe_covers_the_header_and_all_eight_keyslot_areas(tmp_path: Path) -> None:
    img = tmp_path / "l1.img"
    make_luks(img, data=False)
    dump = subprocess.run(
        ["cryptsetup", "luksDump", str(img)], capture_output=True, check=True, text=True
    ).stdout
    # luksDump names the active slot's offset; the others follow in 504-sector steps
    # (64-byte key x 4000 stripes = 500 sectors, aligned to 8), as cryptsetup lays them out.
    assert re.findall(r"Key material offset:\s*(\d+)", dump) == ["8"]
    reported = luks.key_material_regions(str(img))
    # the phdr, then eight keyslot areas of key_bytes x 4000 stripes each
    assert reported == [(0, 592)] + [((8 + 504 * i) * 512, 500 * 512) for i in range(8)]
    wiped = luks.wipe_regions(str(img), SIZE)
    assert _covered(reported, wiped)
    assert all(off + n <= 4096 * 512 for off, n in wiped)  # nothing of the payload


def test_luks2_wipe_covers_both_headers_and_every_keyslot_area(tmp_path: Path) -> None:
    img = tmp_path / "l2.img"
    make_luks(img, version=2, data=False)
    meta = json.loads(
        subprocess.run(
            ["cryptsetup", "luksDump", "--dump-json-metadata", str(img)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    areas = [(int(k["area"]["offset"]), int(k["area"]["size"])) for k in meta["keyslots"].values()]
    wiped = luks.wipe_regions(str(img), SIZE)
    json_end = 2 * (4096 + int(meta["config"]["json_size"]))
    assert _covered([(0, json_end), *areas], wiped)


def test_unparseable_header_falls_back_to_everything_before_the_payload(tmp_path: Path) -> None:
    img = tmp_path / "l1.img"
    make_luks(img, data=False)
    with img.open("r+b") as f:
        f.seek(208 + 40)  # keyslot 0's key-material offset: far beyond the payload
        f.write((0xFFFFFF).to_bytes(4, "big"))
    assert luks.wipe_regions(str(img), SIZE) == [(0, 4096 * 512)]
    with pytest.raises(UnsupportedError):
        damaged_header_regions(b"\0" * 1024)
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(MIB))
    with pytest.raises(UnsupportedError):
        luks.wipe_regions(str(plain), MIB)
