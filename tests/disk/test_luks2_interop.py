"""LUKS2 against real cryptsetup: its images served by our plugin, ours opened by it.

Data written through the plugin is checked with the volume key cryptsetup reveals and an
independent per-sector XTS (tests/luks2_helpers.py), so a shared IV mistake cannot hide.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.errors import InvalidPassphrase
from tests.support.luks2 import (
    ARGON,
    OUR_ARGON,
    OUR_PBKDF2,
    PBKDF2,
    cs,
    luks2_format,
    metadata,
    opens,
    payload,
    volume_key,
    xts_decrypt,
)
from tests.support.nbd import connect, serve_plugin, write_secret

SIZE = 4 << 20
pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="needs cryptsetup")


@pytest.fixture
def other_key(tmp_path: Path) -> Path:
    path = tmp_path / "key2"
    write_secret(path, b"a second passphrase")
    return path


def _write_pattern(sock: str, sector: int) -> dict[int, bytes]:
    """Aligned, unaligned and multi-sector writes; returns offset -> data written."""
    writes = {
        0: os.urandom(2 * sector),
        sector * 5 + 100: os.urandom(300),  # inside one sector: read-modify-write
        SIZE - 3 * sector: os.urandom(3 * sector),  # the last sectors
        1 << 20: os.urandom(64 << 10),
    }
    with connect(sock) as h:
        assert h.get_size() == SIZE  # type: ignore[attr-defined]
        for off, data in writes.items():
            h.pwrite(data, off)  # type: ignore[attr-defined]
        h.flush()  # type: ignore[attr-defined]
        for off, data in writes.items():
            assert h.pread(len(data), off) == data  # type: ignore[attr-defined]
    return writes


def _check_independently(image: Path, keyfile: Path, sector: int, writes: dict[int, bytes]) -> None:
    key = volume_key(image, keyfile)
    assert len(key) == 64
    for off, data in writes.items():
        first = off // sector
        end = -(-(off + len(data)) // sector)
        plain = xts_decrypt(
            key, payload(image, first * sector, (end - first) * sector), sector, first
        )
        assert plain[off - first * sector : off - first * sector + len(data)] == data


@pytest.mark.parametrize("sector", [512, 4096])
@pytest.mark.parametrize("kdf", ["argon2id", "pbkdf2"])
def test_cryptsetup_image_served_by_plugin(
    tmp_path: Path, keyfile: Path, sockdir: Path, kdf: str, sector: int
) -> None:
    image = tmp_path / "cs.img"
    luks2_format(
        image,
        keyfile,
        SIZE,
        "--sector-size",
        str(sector),
        *(ARGON if kdf == "argon2id" else PBKDF2),
    )
    with serve_plugin(image, keyfile, sockdir) as sock:
        writes = _write_pattern(sock, sector)
    _check_independently(image, keyfile, sector, writes)
    assert opens(image, keyfile)  # we never touched the header


@pytest.mark.parametrize("sector", [512, 4096])
def test_data_cryptsetup_encrypted_reads_back(
    tmp_path: Path, keyfile: Path, sockdir: Path, sector: int
) -> None:
    """cryptsetup reencrypt --encrypt of known plaintext, read through the plugin."""
    plain = b"".join(i.to_bytes(8, "little") * 64 for i in range(SIZE // 512))
    image = tmp_path / "re.img"
    with image.open("wb") as f:
        f.write(plain)
        f.truncate(SIZE + (32 << 20))
    cs(
        "reencrypt",
        "--encrypt",
        "--type",
        "luks2",
        "--force-offline-reencrypt",
        "--reduce-device-size",
        "32M",
        "--sector-size",
        str(sector),
        *PBKDF2,
        "--batch-mode",
        "--key-file",
        str(keyfile),
        str(image),
    )
    assert metadata(image)["segments"]["0"]["sector_size"] == sector
    with serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-r",)) as sock, connect(sock) as h:
        got = b"".join(h.pread(1 << 20, off) for off in range(0, SIZE, 1 << 20))  # type: ignore[attr-defined]
    assert got == plain


@pytest.mark.parametrize(
    ("sector", "opts"),
    [(4096, OUR_ARGON), (512, OUR_PBKDF2), (4096, {**OUR_ARGON, "pbkdf": "argon2i"})],
    ids=["argon2id-4096", "pbkdf2-512", "argon2i-4096"],
)
def test_our_image_accepted_by_cryptsetup(
    tmp_path: Path, keyfile: Path, sockdir: Path, sector: int, opts: dict[str, object]
) -> None:
    image = tmp_path / "ours.img"
    secret = keyfile.read_bytes()
    luks.create_image(str(image), SIZE, secret, fmt="luks2", sector_size=sector, **opts)
    assert cs("luksDump", str(image)).returncode == 0
    meta = metadata(image)
    assert meta["segments"]["0"]["sector_size"] == sector
    assert meta["keyslots"]["0"]["kdf"]["type"] == opts["pbkdf"]
    assert opens(image, keyfile)
    with serve_plugin(image, keyfile, sockdir) as sock:
        writes = _write_pattern(sock, sector)
    _check_independently(image, keyfile, sector, writes)


def test_keyslots_both_ways(tmp_path: Path, keyfile: Path, other_key: Path) -> None:
    image = tmp_path / "ks.img"
    secret, other = keyfile.read_bytes(), other_key.read_bytes()
    luks.create_image(str(image), SIZE, secret, fmt="luks2", **OUR_ARGON)
    # cryptsetup adds a keyslot: we open with it.
    cs(
        "luksAddKey",
        "--batch-mode",
        *PBKDF2,
        "--key-file",
        str(keyfile),
        str(image),
        str(other_key),
    )
    vol = luks.open_volume(str(image), other, readonly=True)
    assert vol.keyslot == 1
    vol.close()
    # cryptsetup kills our slot 0: we refuse the old passphrase.
    cs("luksKillSlot", "--batch-mode", "--key-file", str(other_key), str(image), "0")
    with pytest.raises(InvalidPassphrase):
        luks.open_volume(str(image), secret, readonly=True)
    # we add a keyslot: cryptsetup opens with it.
    third = tmp_path / "key3"
    write_secret(third, b"third one")
    assert luks.add_key(str(image), other, b"third one", **OUR_PBKDF2) == 0
    assert opens(image, third) and opens(image, other_key)
    # we change a passphrase, then remove one: cryptsetup agrees.
    luks.change_key(str(image), b"third one", secret, **OUR_ARGON)
    assert opens(image, keyfile) and not opens(image, third)
    luks.remove_key(str(image), other)
    assert not opens(image, other_key) and opens(image, keyfile)
    assert cs("luksDump", str(image)).returncode == 0


def test_tokens_and_unknown_fields_survive_our_changes(
    tmp_path: Path, keyfile: Path, other_key: Path
) -> None:
    image = tmp_path / "tok.img"
    luks2_format(image, keyfile, SIZE, *PBKDF2, "--label", "keepme")
    token = tmp_path / "token.json"
    token.write_text('{"type":"vmshield-test","keyslots":["0"],"note":"keep me","n":[1,2]}')
    cs("token", "import", "--json-file", str(token), str(image))
    before = metadata(image)
    luks.add_key(str(image), keyfile.read_bytes(), other_key.read_bytes(), **OUR_PBKDF2)
    after = metadata(image)
    assert after["tokens"] == before["tokens"]
    assert after["segments"] == before["segments"]
    assert after["config"] == before["config"]
    assert cs("luksDump", str(image)).stdout.count("keepme") == 1
    assert opens(image, other_key)


def test_larger_metadata_area_and_its_secondary(
    tmp_path: Path, keyfile: Path, other_key: Path
) -> None:
    """--luks2-metadata-size 64k: the secondary copy sits at 64 KiB; found even when the
    primary's binary header is unreadable."""
    image = tmp_path / "big.img"
    luks2_format(image, keyfile, SIZE, *PBKDF2, "--luks2-metadata-size", "65536",
                 "--luks2-keyslots-size", "4194304")  # fmt: skip
    info = luks.info(str(image))
    assert info["header_size"] == 65536 and info["warnings"] == []
    with image.open("r+b") as f:  # destroy the primary's magic and size
        f.write(bytes(24))
    info = luks.info(str(image))
    assert info["header_copy"] == "secondary" and info["header_size"] == 65536
    luks.add_key(str(image), keyfile.read_bytes(), other_key.read_bytes(), **OUR_PBKDF2)
    assert luks.info(str(image))["header_copy"] == "primary"
    assert opens(image, other_key) and opens(image, keyfile)
    assert metadata(image)["config"]["keyslots_size"] == "4194304"


@pytest.mark.parametrize("sector", [512, 4096])
def test_every_xts_kernel_on_data_cryptsetup_encrypted(
    tmp_path: Path, keyfile: Path, sector: int
) -> None:
    """cryptsetup's ciphertext, decrypted and made again by each numba kernel in-process."""
    from nbd_plugin.crypto import vaes
    from nbd_plugin.crypto.jit_cipher import XTS_KERNELS
    from nbd_plugin.crypto.xts_native import JitXts

    size = 1 << 20
    plain = os.urandom(size)
    image = tmp_path / "k.img"
    with image.open("wb") as f:
        f.write(plain)
        f.truncate(size + (32 << 20))
    cs(
        "reencrypt", "--encrypt", "--type", "luks2", "--force-offline-reencrypt",
        "--reduce-device-size", "32M", "--sector-size", str(sector), *PBKDF2,
        "--batch-mode", "--key-file", str(keyfile), str(image),
    )  # fmt: skip
    segment = metadata(image)["segments"]["0"]
    with image.open("rb") as f:
        f.seek(int(segment["offset"]))
        ciphertext = f.read(size)
    key = volume_key(image, keyfile)
    for kernel in XTS_KERNELS:
        if kernel == "vaes-xts" and vaes.unavailable() is not None:
            continue  # this CPU has no VAES: the two others are what serves here
        cipher = JitXts(key, sector, sector // 512, kernel=kernel)
        buf = bytearray(ciphertext)
        cipher.decrypt(memoryview(buf), memoryview(buf), 0)
        assert bytes(buf) == plain, kernel
        out = bytearray(size)
        cipher.encrypt(memoryview(plain), memoryview(out), 0)
        assert bytes(out) == ciphertext, kernel
