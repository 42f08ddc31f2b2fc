"""LUKS1 header, AF splitter and keyslot logic, without external tools."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.errors import ImageBusy, ImageError, InvalidPassphrase, UnsupportedError
from nbd_plugin.luks import af
from nbd_plugin.luks.luks1 import format as luks1
from nbd_plugin.osutil.locking import hold_image

PW = b"pw-one"


def make(tmp_path: Path, name: str = "a.img", **kw: object) -> Path:
    path = tmp_path / name
    luks.create_image(str(path), 1 << 20, PW, iterations=1000, **kw)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_bytes", [32, 64])
def test_af_split_merge_roundtrip(hash_name: str, key_bytes: int) -> None:
    key = os.urandom(key_bytes)
    material = af.split(key, 4000, hash_name)
    assert len(material) == key_bytes * 4000
    assert af.merge(material, key_bytes, 4000, hash_name) == key
    material[17] ^= 1  # any damage destroys the key
    assert af.merge(material, key_bytes, 4000, hash_name) != key


def test_header_pack_unpack_roundtrip(tmp_path: Path) -> None:
    path = make(tmp_path)
    raw = path.read_bytes()[: luks1.HEADER_SIZE]
    header = luks1.Luks1Header.unpack(raw)
    assert header.pack() == raw
    assert header.active_slots() == [0]
    assert header.payload_offset == 4096  # cryptsetup's layout for 512-bit keys


def test_layout_matches_cryptsetup() -> None:
    offsets, payload = luks1.layout(64)
    assert offsets[:2] == [8, 512] and payload == 4096
    offsets, payload = luks1.layout(32)
    assert offsets[:2] == [8, 264] and payload == 4096


def test_unlock_and_wrong_passphrase(tmp_path: Path) -> None:
    path = make(tmp_path)
    vol = luks.open_volume(str(path), PW, readonly=True)
    assert (vol.size, vol.payload_offset, vol.keyslot) == (1 << 20, 4096 * 512, 0)
    vol.close()
    with pytest.raises(InvalidPassphrase):
        luks.open_volume(str(path), b"wrong", readonly=True)


def test_keyslot_add_change_remove(tmp_path: Path) -> None:
    path = make(tmp_path)
    assert luks.add_key(str(path), PW, b"two", iterations=1000) == 1
    assert luks.add_key(str(path), b"two", b"three", slot=5, iterations=1000) == 5
    new_index = luks.change_key(str(path), PW, b"one-new", iterations=1000)
    assert new_index == 2  # written to a free slot first, then slot 0 wiped
    with pytest.raises(InvalidPassphrase):
        luks.open_volume(str(path), PW, readonly=True)
    assert luks.remove_key(str(path), b"two") == 1
    assert luks.remove_key(str(path), b"three") == 5
    with pytest.raises(ImageError, match="last one"):
        luks.remove_key(str(path), b"one-new")
    info = luks.info(str(path))
    assert [s["slot"] for s in info["keyslots"] if s["active"]] == [2]
    luks.open_volume(str(path), b"one-new", readonly=True).close()


def test_wiped_slot_material_is_replaced(tmp_path: Path) -> None:
    path = make(tmp_path)
    header = luks1.Luks1Header.unpack(path.read_bytes()[:592])
    area = header.keyslots[0].key_offset * 512
    before = path.read_bytes()[area : area + 4096]
    luks.add_key(str(path), PW, b"two", iterations=1000)
    luks.remove_key(str(path), PW)
    after = path.read_bytes()[area : area + 4096]
    assert before != after


def test_create_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "exists.img"
    path.write_bytes(b"precious")
    with pytest.raises(ImageError, match="already exists"):
        luks.create_image(str(path), 1 << 20, PW, iterations=1000)
    assert path.read_bytes() == b"precious"


def corrupt(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    ("offset", "data", "exc", "message"),
    [
        (0, b"NOTLUKS", ImageError, "not a LUKS image"),
        (6, struct.pack(">H", 7), UnsupportedError, "version 7"),
        (8, b"twofish".ljust(32, b"\0"), UnsupportedError, "twofish"),
        (72, b"md4".ljust(32, b"\0"), UnsupportedError, "md4"),
        (108, struct.pack(">I", 13), ImageError, "key-bytes"),
        (208, struct.pack(">I", 0x12345678), ImageError, "keyslot 0"),
        (208 + 40, struct.pack(">I", 0xFFFFFF), ImageError, "outside the header"),
    ],
)
def test_corrupt_headers_are_refused(
    tmp_path: Path, offset: int, data: bytes, exc: type[Exception], message: str
) -> None:
    path = make(tmp_path)
    corrupt(path, offset, data)
    with pytest.raises(exc, match=message):
        luks.open_volume(str(path), PW, readonly=True)


def test_damaged_keyslot_is_indistinguishable_from_wrong_passphrase(tmp_path: Path) -> None:
    path = make(tmp_path)
    corrupt(path, 4096 + 100, os.urandom(64))
    with pytest.raises(InvalidPassphrase):
        luks.open_volume(str(path), PW, readonly=True)


def test_truncated_images(tmp_path: Path) -> None:
    path = make(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:300])
    with pytest.raises(ImageError, match="truncated"):
        luks.open_volume(str(path), PW, readonly=True)
    path.write_bytes(data[: 4096 * 512 - 4096])
    with pytest.raises(ImageError, match="truncated"):
        luks.open_volume(str(path), PW, readonly=True)


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such image"):
        luks.open_volume(str(tmp_path / "nope.img"), PW, readonly=True)


def test_one_writer_lock(tmp_path: Path) -> None:
    path = make(tmp_path)
    writer = luks.open_volume(str(path), PW, readonly=False)
    with pytest.raises(ImageBusy):
        luks.open_volume(str(path), PW, readonly=False)
    with pytest.raises(ImageBusy):
        luks.open_volume(str(path), PW, readonly=True)
    with pytest.raises(ImageBusy):
        luks.add_key(str(path), PW, b"x", iterations=1000)
    writer.close()
    r1 = luks.open_volume(str(path), PW, readonly=True)
    r2 = luks.open_volume(str(path), PW, readonly=True)  # readers share
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(ImageBusy):
        hold_image(fd, str(path), exclusive=True)
    os.close(fd)
    r1.close()
    r2.close()


def test_key_material_regions_cover_header_and_slots(tmp_path: Path) -> None:
    path = make(tmp_path)
    regions = luks.key_material_regions(str(path))
    assert regions[0] == (0, 592)
    assert len(regions) == 9
    assert all(off + n <= 4096 * 512 for off, n in regions)
    assert luks.payload_region(str(path)) == (4096 * 512, 1 << 20)
