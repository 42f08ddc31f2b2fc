"""Crafted LUKS headers (issue 12, findings 1 and 9): each is refused with the project's own
one-line error, never opened with a wrong key, never a traceback, and still erasable.

Images are made here with cheap PBKDF2 (1000 iterations); LUKS2 JSON edits recompute the
header checksum (tests.support.luks2.rewrite_json) so the JSON parser and the metadata checks
are what is tested.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest

from nbd_plugin import luks
from nbd_plugin.errors import ImageError, InvalidPassphrase, VmshieldError
from nbd_plugin.serve.disk import EncryptedDisk
from tests.support.luks2 import OUR_PBKDF2, rewrite_json, rewrite_json_text, volume_key, xts_decrypt
from tests.support.luks2 import set_json_path as _set

PW = b"right passphrase"
WRONG = b"wrong passphrase"
SIZE = 1 << 20
U64 = (1 << 64) - 1


@pytest.fixture
def luks2_image(tmp_path: Path) -> Path:
    image = tmp_path / "l2.img"
    luks.create_image(str(image), SIZE, PW, fmt="luks2", **OUR_PBKDF2)
    return image


@pytest.fixture
def luks1_image(tmp_path: Path) -> Path:
    image = tmp_path / "l1.img"
    luks.create_image(str(image), SIZE, PW, iterations=1000)
    return image


def _refused(image: Path, *, info_too: bool = True) -> None:
    """open_volume refuses with a product error, wrong and right passphrase alike."""
    for passphrase in (WRONG, PW):
        with pytest.raises(VmshieldError) as err:
            luks.open_volume(str(image), passphrase, readonly=True).close()
        assert not isinstance(err.value, InvalidPassphrase) or passphrase == WRONG
        assert "\n" not in str(err.value)
    if info_too:
        with pytest.raises(ImageError):
            luks.info(str(image))
    _erasable(image)


def _erasable(image: Path) -> None:
    """A crafted header still gets its key material wiped: everything before the payload."""
    regions = luks.wipe_regions(str(image), image.stat().st_size)
    version = image.read_bytes()[7]
    assert regions[0][0] == 0
    assert regions[0][1] >= (16 << 20 if version == 2 else 4096 * 512)


# ---- finding 1: a digest shorter than its hash matched every key ------------------------
@pytest.mark.parametrize("digest", [b"", b"\x00", bytes(19)])
def test_luks2_short_digest_is_refused_not_matched(luks2_image: Path, digest: bytes) -> None:
    rewrite_json(luks2_image, _set("digests.0.digest", base64.b64encode(digest).decode()))
    _refused(luks2_image)


def test_luks2_digest_of_20_bytes_still_opens_as_in_cryptsetup(luks2_image: Path) -> None:
    """cryptsetup accepts LUKS1's 20-byte digest length in LUKS2 (converted images)."""

    def truncate(doc: dict[str, Any]) -> None:
        full = base64.b64decode(doc["digests"]["0"]["digest"])
        doc["digests"]["0"]["digest"] = base64.b64encode(full[:20]).decode()

    rewrite_json(luks2_image, truncate)
    luks.open_volume(str(luks2_image), PW, readonly=True).close()
    with pytest.raises(InvalidPassphrase):
        luks.open_volume(str(luks2_image), WRONG, readonly=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("digests.0.salt", base64.b64encode(bytes(16)).decode()),
        ("digests.0.digest", base64.b64encode(bytes(65)).decode()),
        ("keyslots.0.kdf.salt", base64.b64encode(bytes(8)).decode()),
        ("keyslots.0.kdf.salt", ""),
    ],
)
def test_luks2_salts_and_digests_of_the_wrong_length_are_refused(
    luks2_image: Path, field: str, value: str
) -> None:
    rewrite_json(luks2_image, _set(field, value))
    _refused(luks2_image)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("keyslots.0.key_size", 1 << 40),
        ("keyslots.0.af.stripes", 1 << 33),
        ("keyslots.0.area.key_size", -1),
        ("keyslots.0.area.size", str(1 << 64)),
        ("keyslots.0.area.offset", "4096"),  # inside the header copies
        ("config.keyslots_size", "1000"),  # not 4 KiB aligned
        ("config.keyslots_size", str(256 << 20)),  # over cryptsetup's 128 MiB
        ("segments.0.offset", "16777217"),  # not sector aligned
        ("segments.0.size", "0"),
        ("segments.0.size", "4097"),
        ("segments.0.sector_size", 4095),
        ("segments.0.sector_size", 1 << 33),
        ("digests.0.keyslots", ["7"]),  # refers to a keyslot that does not exist
        ("digests.0.segments", ["0", "3"]),
    ],
)
def test_luks2_lengths_and_offsets_beyond_cryptsetup_limits_are_refused(
    luks2_image: Path, field: str, value: Any
) -> None:
    rewrite_json(luks2_image, _set(field, value))
    _refused(luks2_image)


def test_luks2_overlapping_keyslot_areas_are_refused(luks2_image: Path) -> None:
    luks.add_key(str(luks2_image), PW, b"second", **OUR_PBKDF2)
    rewrite_json(
        luks2_image,
        lambda d: d["keyslots"]["1"]["area"].update(offset=d["keyslots"]["0"]["area"]["offset"]),
    )
    _refused(luks2_image)


# ---- finding 9: tracebacks ----------------------------------------------------------------
@pytest.mark.parametrize("depth", [33, 5000])
def test_luks2_deep_json_nesting_is_one_error(luks2_image: Path, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    token = '{"0":{"type":"x","keyslots":[],"n":' + nested + "}}"
    rewrite_json_text(luks2_image, lambda text: text.replace('"tokens":{}', f'"tokens":{token}'))
    _refused(luks2_image)


@pytest.mark.parametrize("field", ["digests.0.iterations", "keyslots.0.kdf.iterations"])
def test_luks2_iterations_of_2_to_the_64_are_one_error(luks2_image: Path, field: str) -> None:
    rewrite_json(luks2_image, _set(field, 1 << 64))
    _refused(luks2_image)


@pytest.mark.parametrize("name", ["\u00b2", "\u0663", "\uff10", "0x1", ""])
def test_luks2_ids_must_be_ascii_digits(luks2_image: Path, name: str) -> None:
    def rename(doc: dict[str, Any]) -> None:
        doc["keyslots"][name] = doc["keyslots"].pop("0")
        doc["digests"]["0"]["keyslots"] = [name]

    rewrite_json(luks2_image, rename)
    _refused(luks2_image)


@pytest.mark.parametrize("value", ["\u0661\u0666\u0667\u0667\u0667\u0662\u0661\u0666", "1e3", "-0"])
def test_luks2_numbers_must_be_ascii_digits(luks2_image: Path, value: str) -> None:
    rewrite_json(luks2_image, _set("segments.0.offset", value))
    _refused(luks2_image)


def test_luks2_iv_tweak_near_2_to_the_64_wraps_as_in_dm_crypt(luks2_image: Path) -> None:
    tweak = U64 - 100  # payload sector 13 (IV 13 x 8 past the tweak) is the first to wrap
    rewrite_json(luks2_image, _set("segments.0.iv_tweak", str(tweak)))
    disk = EncryptedDisk(luks.open_volume(str(luks2_image), PW, readonly=False))
    plain = bytes(range(256)) * 16 * 32  # 32 sectors of 4096 bytes: 8-39, wrapping in 13
    for first in (8, 16):  # a request across the wrap, and one that starts past it
        disk.pwrite(plain, first * 4096)
        back = bytearray(len(plain))
        disk.pread(back, first * 4096)
        assert back == plain
    disk.pwrite(plain, 8 * 4096)
    disk.flush()
    disk.close()
    start = (16 << 20) + 8 * 4096
    raw = luks2_image.read_bytes()[start : start + len(plain)]
    # cryptsetup's volume key and an XTS that shares no code with vmshield's
    keyfile = luks2_image.parent / "key"
    keyfile.write_bytes(PW)
    key = volume_key(luks2_image, keyfile)
    assert xts_decrypt(key, raw, 4096, 8, tweak) == plain


def test_iv_wrap_in_requests_split_into_pieces() -> None:
    """A 3 MiB request goes through the cipher in pieces: each piece's first IV wraps too."""
    from nbd_plugin.crypto.registry import make_cipher

    key = bytes(range(64))
    cipher = make_cipher("aes", "xts-plain64", key, 4096, 8)
    plain = bytes(range(256)) * 16 * 768  # 768 sectors: more than one piece
    out = bytearray(len(plain))
    first = U64 - 8 * 100  # the second piece starts past the wrap
    cipher.encrypt(plain, out, first)
    assert xts_decrypt(key, bytes(out), 4096, 0, first) == plain


# ---- huge KDF costs are refused before any work --------------------------------------------
@pytest.mark.parametrize(
    "kdf",
    [
        {"type": "pbkdf2", "hash": "sha256", "iterations": 1 << 31},
        {"type": "argon2id", "time": 4, "memory": 8 << 20, "cpus": 1},  # 8 GiB
        {"type": "argon2id", "time": 1 << 31, "memory": 32, "cpus": 1},
        {"type": "argon2i", "time": 4, "memory": 1024, "cpus": 1 << 20},
    ],
)
def test_huge_kdf_costs_are_refused_at_once(luks2_image: Path, kdf: dict[str, Any]) -> None:
    def edit(doc: dict[str, Any]) -> None:
        kdf["salt"] = doc["keyslots"]["0"]["kdf"]["salt"]
        doc["keyslots"]["0"]["kdf"] = kdf

    rewrite_json(luks2_image, edit)
    start = time.monotonic()
    for passphrase in (WRONG, PW):
        with pytest.raises(VmshieldError):
            luks.open_volume(str(luks2_image), passphrase, readonly=True).close()
    assert time.monotonic() - start < 5
    _erasable(luks2_image)


# ---- LUKS1: the same limits cryptsetup enforces ------------------------------------------
def _patch_luks1(image: Path, offset: int, value: int) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(4, "big"))


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (208 + 44, 3999),  # keyslot 0 stripes (cryptsetup: exactly 4000)
        (208 + 48 + 44, 1),  # an inactive keyslot's stripes too
        (208 + 48 + 40, 8),  # keyslot 1's area on top of keyslot 0's
        (208 + 40, 1),  # keyslot 0's area inside the phdr
        (108, 1 << 31),  # key-bytes
        (208 + 4, 1 << 31),  # keyslot 0's iterations: past OpenSSL's int (cryptography panicked)
        (164, (1 << 32) - 1),  # mk-digest-iter
    ],
)
def test_luks1_lengths_beyond_cryptsetup_limits_are_refused(
    luks1_image: Path, offset: int, value: int
) -> None:
    _patch_luks1(luks1_image, offset, value)
    _refused(luks1_image)


def test_luks1_digest_is_compared_over_its_full_20_bytes(luks1_image: Path) -> None:
    with luks1_image.open("r+b") as f:
        f.seek(112 + 19)  # the last byte of mk-digest
        last = f.read(1)
        f.seek(112 + 19)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(InvalidPassphrase):
        luks.open_volume(str(luks1_image), PW, readonly=True)


@pytest.mark.parametrize(
    "kdf",
    [
        # within cryptsetup's limits, but hours of uninterruptible work on any machine
        {"type": "pbkdf2", "hash": "sha256", "iterations": (1 << 31) - 1},
        {"type": "argon2id", "time": 1 << 24, "memory": 1024, "cpus": 1},
    ],
)
def test_kdf_work_beyond_minutes_is_refused_before_it_starts(
    luks2_image: Path, kdf: dict[str, Any]
) -> None:
    def edit(doc: dict[str, Any]) -> None:
        kdf["salt"] = doc["keyslots"]["0"]["kdf"]["salt"]
        doc["keyslots"]["0"]["kdf"] = kdf

    rewrite_json(luks2_image, edit)
    luks.info(str(luks2_image))  # describing it costs nothing
    start = time.monotonic()
    with pytest.raises(ImageError, match="would take"):
        luks.open_volume(str(luks2_image), WRONG, readonly=True)
    assert time.monotonic() - start < 20


def test_luks1_work_beyond_minutes_is_refused_before_it_starts(luks1_image: Path) -> None:
    _patch_luks1(luks1_image, 208 + 4, (1 << 31) - 1)  # keyslot 0's iterations
    start = time.monotonic()
    with pytest.raises(ImageError, match="would take"):
        luks.open_volume(str(luks1_image), WRONG, readonly=True)
    assert time.monotonic() - start < 20
