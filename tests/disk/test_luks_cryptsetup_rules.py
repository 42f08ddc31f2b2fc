"""cryptsetup's header rules, one crafted image per rule (issue 20, part A).

Each image is made by cryptsetup 2.6 and edited here (checksums recomputed, both copies
unless said otherwise). For every rule the test shows cryptsetup refusing the image
(``luksDump`` and ``isLuks`` fail) and vmshield refusing it too: ``info`` and ``open_volume``
raise ImageError (damage, never "not supported"), in one line, and the image is unchanged.
The other way: a header cryptsetup accepts but vmshield does not implement (a reencryption, an
unknown segment type) is "not supported by vmshield", never "damaged, restore a backup".
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbd_plugin import luks
from nbd_plugin.errors import ImageError, UnsupportedError
from tests.support.luks2 import PBKDF2, cs, digest, luks2_format
from tests.support.luks2 import set_json_path as _set
from tests.support.nbd import PLUGIN, cryptsetup_format, run_nbdkit_expect_failure

SIZE = 1 << 20
HDR = 16384
pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="needs cryptsetup")


@pytest.fixture
def image(tmp_path: Path, keyfile: Path) -> Path:
    path = tmp_path / "rule.img"
    luks2_format(path, keyfile, SIZE, *PBKDF2)
    return path


def _rewrite_area(image: Path, edit: Callable[[bytes], bytes], copies: tuple[int, ...]) -> None:
    """Replace each copy's whole JSON area by ``edit(area)`` and fix its sha256 checksum."""
    with image.open("r+b") as f:
        for offset in copies:
            f.seek(offset)
            raw = bytearray(f.read(HDR))
            raw[4096:] = edit(bytes(raw[4096:]))
            assert len(raw) == HDR
            raw[448:512] = bytes(64)
            raw[448:480] = hashlib.sha256(raw).digest()
            f.seek(offset)
            f.write(raw)


def _text_edit(edit: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """An area edit from an edit of the JSON text (NUL padding kept)."""

    def area(old: bytes) -> bytes:
        return edit(old.split(b"\0", 1)[0]).ljust(len(old), b"\0")

    return area


def _doc_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def text(old: bytes) -> bytes:
        doc = json.loads(old)
        edit(doc)
        return json.dumps(doc, separators=(",", ":")).encode()

    return _text_edit(text)


def _garbage_after_nul(area: bytes) -> bytes:
    end = area.index(b"\0")
    return area[: end + 100] + b"\x01" + area[end + 101 :]


def _second_digest(doc: dict[str, Any]) -> None:
    doc["digests"]["1"] = dict(doc["digests"]["0"])


def _renumber_segment(doc: dict[str, Any]) -> None:
    doc["segments"]["1"] = doc["segments"].pop("0")
    doc["digests"]["0"]["segments"] = ["1"]


def _stray_reencrypt_keyslot(doc: dict[str, Any]) -> None:
    doc["keyslots"]["1"] = {
        "type": "reencrypt",
        "key_size": 1,
        "mode": "reencrypt",
        "direction": "forward",
        "area": {"type": "none", "offset": "1048576", "size": "4096"},
    }


def _empty_area(doc: dict[str, Any]) -> None:
    area = {"type": "raw", "offset": "1048576", "size": "0"}
    doc["keyslots"]["1"] = {"type": "x", "key_size": 1, "area": area}


# (rule, cryptsetup function, area edit): each accepted by vmshield before issue 20
RULES: list[tuple[str, str, Callable[[bytes], bytes]]] = [
    ("garbage-after-nul", "validate_json_area", _garbage_after_nul),
    ("leading-space", "validate_json_area", _text_edit(lambda t: b" " + t)),
    ("leading-newline", "validate_json_area", _text_edit(lambda t: b"\n" + t)),
    ("keyslot-in-two-digests", "LUKS2_keyslots_validate", _doc_edit(_second_digest)),
    (
        "keyslot-in-no-digest",
        "LUKS2_keyslots_validate",
        _doc_edit(_set("digests.0.keyslots", [])),
    ),
    ("segment-flags-ints", "hdr_validate_segments", _doc_edit(_set("segments.0.flags", [1]))),
    ("segment-flags-string", "hdr_validate_segments", _doc_edit(_set("segments.0.flags", "x"))),
    ("segment-id-gap", "hdr_validate_segments", _doc_edit(_renumber_segment)),
    ("config-flags-ints", "hdr_validate_config", _doc_edit(_set("config.flags", [7]))),
    (
        "requirements-not-object",
        "hdr_validate_requirements",
        _doc_edit(_set("config.requirements", "x")),
    ),
    ("token-without-type", "hdr_validate_tokens", _doc_edit(_set("tokens.0", {"keyslots": []}))),
    ("keyslot-area-empty", "validate_intervals", _doc_edit(_empty_area)),
    ("reencrypt-keyslot-alone", "LUKS2_keyslots_validate", _doc_edit(_stray_reencrypt_keyslot)),
]


def _cryptsetup_refuses(image: Path) -> str:
    dump = cs("luksDump", "--disable-locks", str(image), check=False)
    assert dump.returncode != 0, f"cryptsetup accepts it:\n{dump.stdout}"
    assert cs("isLuks", "--disable-locks", str(image), check=False).returncode != 0
    return dump.stderr


def _cryptsetup_accepts(image: Path) -> None:
    assert cs("luksDump", "--disable-locks", str(image), check=False).returncode == 0


def _vmshield_refuses(image: Path, keyfile: Path, error: type[Exception]) -> str:
    """info and open_volume both raise exactly ``error`` (one line); the image is unchanged."""
    before = digest(image)
    messages = []
    with pytest.raises(ImageError) as info_err:
        luks.info(str(image))
    with pytest.raises(ImageError) as open_err:
        luks.open_volume(str(image), keyfile.read_bytes(), readonly=False)
    for err in (info_err, open_err):
        assert type(err.value) is error, err.value
        messages.append(str(err.value))
        assert "\n" not in str(err.value) and str(err.value).startswith(str(image))
    assert digest(image) == before
    return messages[1]


@pytest.mark.parametrize(("rule", "function", "edit"), RULES, ids=[r for r, _, _ in RULES])
def test_a_header_cryptsetup_refuses_is_refused_as_damaged(
    image: Path, keyfile: Path, rule: str, function: str, edit: Callable[[bytes], bytes]
) -> None:
    _rewrite_area(image, edit, (0, HDR))
    _cryptsetup_refuses(image)
    message = _vmshield_refuses(image, keyfile, ImageError)
    assert "both LUKS2 header copies are damaged" in message and "cryptsetup" in message


def test_a_refused_primary_falls_back_to_the_valid_secondary(image: Path, keyfile: Path) -> None:
    """A copy that breaks a rule is a damaged copy, as in cryptsetup: the other one is used."""
    _rewrite_area(image, _garbage_after_nul, (0,))
    _cryptsetup_accepts(image)  # cryptsetup --disable-locks: no repair written, but it loads
    meta = luks.info(str(image))
    assert meta["header_copy"] == "secondary" and "not all zero" in meta["warnings"][0]
    luks.open_volume(str(image), keyfile.read_bytes(), readonly=True).close()


@pytest.mark.parametrize("tail", [b"\n", b" \t\r\n"])
def test_json_whitespace_after_the_document_is_accepted_as_by_json_c(
    image: Path, keyfile: Path, tail: bytes
) -> None:
    _rewrite_area(image, _text_edit(lambda t: t + tail), (0, HDR))
    _cryptsetup_accepts(image)
    luks.open_volume(str(image), keyfile.read_bytes(), readonly=True).close()


@pytest.mark.parametrize("tail", [b"\x0b", b"\x0c", b" x"])
def test_anything_else_after_the_document_is_refused(
    image: Path, keyfile: Path, tail: bytes
) -> None:
    _rewrite_area(image, _text_edit(lambda t: t + tail), (0, HDR))
    _cryptsetup_refuses(image)
    _vmshield_refuses(image, keyfile, ImageError)


# ---- the binary headers: a foreign signature over the primary ------------------------------
def _lvm_label(device_size: int) -> bytes:
    """An LVM2 physical volume label (sector 1): what pvcreate leaves at the image start."""
    pv_header = b"A" * 32 + struct.pack("<Q", device_size) + bytes(64)
    body = (struct.pack("<I", 32) + b"LVM2 001" + pv_header).ljust(512 - 20, b"\0")
    crc = zlib.crc32(body, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF  # LVM's CRC: no final xor
    return b"LABELONE" + struct.pack("<QI", 1, crc) + body


@pytest.mark.parametrize("wipe_magic", [True, False], ids=["magic-wiped", "magic-kept"])
def test_an_lvm_label_over_the_primary_is_ambiguous_not_recovered(
    image: Path, keyfile: Path, wipe_magic: bool
) -> None:
    with image.open("r+b") as f:
        if wipe_magic:
            f.write(bytes(512))
        f.seek(512)
        f.write(_lvm_label(image.stat().st_size))
    blkid = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", str(image)], capture_output=True, text=True
    )
    assert blkid.stdout.strip() == "LVM2_member"  # the real libblkid sees the PV
    assert "ambiguous signatures" in _cryptsetup_refuses(image)
    message = _vmshield_refuses(image, keyfile, ImageError)
    assert "LVM2_member" in message and "ambiguous" in message
    r = run_nbdkit_expect_failure(["python", PLUGIN, f"image={image}", f"passphrase=+{keyfile}"])
    assert r.returncode == 1 and "LVM2_member" in r.stderr and "Traceback" not in r.stderr


def test_a_zeroed_primary_still_recovers_from_the_secondary(image: Path, keyfile: Path) -> None:
    """Nothing else on the image: cryptsetup uses the secondary, and so does vmshield."""
    with image.open("r+b") as f:
        f.write(bytes(4096))
    _cryptsetup_accepts(image)
    assert luks.info(str(image))["header_copy"] == "secondary"
    luks.open_volume(str(image), keyfile.read_bytes(), readonly=True).close()


# ---- images shorter than their metadata -------------------------------------------------------
def test_luks2_image_shorter_than_its_keyslots_area_is_refused(image: Path, keyfile: Path) -> None:
    with image.open("r+b") as f:
        f.truncate(1 << 20)  # both header copies intact, the keyslots area cut
    assert "too small" in _cryptsetup_refuses(image)
    assert "truncated" in _vmshield_refuses(image, keyfile, ImageError)


@pytest.fixture
def luks1_image(tmp_path: Path, keyfile: Path) -> Path:
    path = tmp_path / "l1.img"
    cryptsetup_format(path, keyfile, SIZE, "--key-size", "512")
    return path


def test_luks1_image_shorter_than_its_keyslots_is_refused(luks1_image: Path, keyfile: Path) -> None:
    with luks1_image.open("r+b") as f:
        f.truncate(1 << 20)
    assert "too small" in _cryptsetup_refuses(luks1_image)
    assert "truncated" in _vmshield_refuses(luks1_image, keyfile, ImageError)


def test_luks1_image_shorter_than_its_payload_offset_is_no_0_byte_disk(
    luks1_image: Path, keyfile: Path
) -> None:
    """The keyslots fit, the payload does not start: cryptsetup's luksDump shows the header,
    its activation refuses the device ("offset is beyond real size", device-mapper: not
    runnable here); vmshield used to describe it as a 0-byte disk."""
    keyslots_end = 8 + 7 * 504 + 500  # sectors: 8 slots of 4000 x 64 bytes, 4 KiB aligned
    with luks1_image.open("r+b") as f:
        f.truncate(keyslots_end * 512 + 4096)
    _cryptsetup_accepts(luks1_image)
    assert "payload at byte" in _vmshield_refuses(luks1_image, keyfile, ImageError)


# ---- the other way: valid headers vmshield does not implement ---------------------------------
def _two_segments(doc: dict[str, Any]) -> None:
    doc["segments"]["0"]["size"] = "4096"
    doc["segments"]["1"] = dict(doc["segments"]["0"], offset=str((16 << 20) + 4096))
    doc["segments"]["1"]["size"] = "dynamic"
    doc["digests"]["0"]["segments"].append("1")


UNSUPPORTED: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("two-segments", _doc_edit(_two_segments), "reencryption"),
    ("linear-segment", _doc_edit(_set("segments.0.type", "linear")), "'linear'"),
    (
        "reencrypt-requirement",
        _doc_edit(_set("config.requirements", {"mandatory": ["offline-reencrypt"]})),
        "offline-reencrypt",
    ),
]


def _not_supported(image: Path, keyfile: Path, what: str) -> None:
    _cryptsetup_accepts(image)
    message = _vmshield_refuses(image, keyfile, UnsupportedError)
    assert message.startswith(f"{image}: not supported by vmshield: ") and what in message
    assert "damaged" not in message and "backup" not in message


@pytest.mark.parametrize(("name", "edit", "what"), UNSUPPORTED, ids=[n for n, _, _ in UNSUPPORTED])
def test_a_valid_header_vmshield_lacks_is_not_supported_not_damaged(
    image: Path, keyfile: Path, name: str, edit: Callable[[bytes], bytes], what: str
) -> None:
    _rewrite_area(image, edit, (0, HDR))
    _not_supported(image, keyfile, what)


def test_an_interrupted_reencryption_is_not_supported_not_damaged(
    image: Path, keyfile: Path
) -> None:
    """A real one: cryptsetup reencrypt --init-only leaves three segments, a reencrypt keyslot
    and the online-reencrypt-v2 requirement, as an interrupted reencryption does."""
    cs("reencrypt", "--init-only", "--batch-mode", "--key-file", str(keyfile), *PBKDF2, str(image))
    _not_supported(image, keyfile, "online-reencrypt")
    r = run_nbdkit_expect_failure(["python", PLUGIN, f"image={image}", f"passphrase=+{keyfile}"])
    assert r.returncode == 1 and "not supported by vmshield" in r.stderr
    assert "backup" not in r.stderr and "Traceback" not in r.stderr
