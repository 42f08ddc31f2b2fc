"""Key-material regions: our own LUKS1/LUKS2 parsers (the fallback) against cryptsetup."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nbd_plugin.errors import UnsupportedError
from nbd_plugin.luks import regions as keyregions
from nbd_plugin.luks import volume as container
from tests.support.erase import MIB, make_luks


def _covered(inner: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    return all(any(o <= i and i + n <= o + m for o, m in outer) for i, n in inner)


def test_own_luks1_parser_covers_what_the_container_reports(tmp_path: Path) -> None:
    img = tmp_path / "l1.img"
    make_luks(img, data=False)
    head = keyregions.read_head(str(img), 16 * MIB)
    own = keyregions.luks1_regions(head)
    assert _covered(container.key_material_regions(str(img)), own)
    # eight keyslot areas of key_bytes x 4000 stripes each, after the phdr
    assert len(own) == 9 and own[0] == (0, 1024)


def test_own_luks2_parser_finds_both_headers_and_every_keyslot_area(tmp_path: Path) -> None:
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
    own = keyregions.luks2_regions(keyregions.read_head(str(img), 16 * MIB))
    json_end = 2 * (4096 + int(meta["config"]["json_size"]))
    assert _covered([(0, json_end), *areas], own)


def test_unparseable_header_falls_back_to_everything_before_the_payload(tmp_path: Path) -> None:
    img = tmp_path / "l1.img"
    make_luks(img, data=False)
    head = bytearray(keyregions.read_head(str(img), 16 * MIB))
    head[208 + 40 : 208 + 44] = (0xFFFFFF).to_bytes(4, "big")  # keyslot 0 far beyond payload
    assert keyregions.own_regions(bytes(head)) == [(0, 4096 * 512)]
    with pytest.raises(UnsupportedError):
        keyregions.own_regions(b"\0" * 1024)
