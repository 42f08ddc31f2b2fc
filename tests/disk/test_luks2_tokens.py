"""Clevis tokens in LUKS2 headers (nbd_plugin.luks.luks2.tokens): parse, add with a keyslot,
drop with it, refuse hostile ones; `keyslot=` opens that keyslot only. cryptsetup checks
what vmshield wrote."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.errors import ImageError, InvalidPassphrase
from nbd_plugin.luks.luks2 import tokens
from nbd_plugin.luks.luks2.headers import read_header, write_header
from nbd_plugin.luks.luks2.metadata import Metadata
from tests.support.nbd import SECRET

BOUND = b"0123456789abcdef" * 4


def b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


HEADER = {"alg": "ECDH-ES", "enc": "A256GCM",
          "clevis": {"pin": "tang", "tang": {"url": "http://tang.test:7500"}}}  # fmt: skip
COMPACT = f"{b64(HEADER)}..aXY.Y2lwaGVy.dGFn".encode()


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = str(tmp_path / "t.img")
    luks.create_image(path, 1 << 20, SECRET, fmt="luks2", iterations=1000, pbkdf="pbkdf2")
    return path


def edit_tokens(path: str, edit: object) -> None:
    import os

    fd = os.open(path, os.O_RDWR)
    try:
        header = read_header(fd, path)
        doc = json.loads(header.meta.text)
        doc["tokens"] = edit
        write_header(fd, header, Metadata.parse(json.dumps(doc), header.hdr_size))
    finally:
        os.close(fd)


def test_compact_roundtrip_and_pins() -> None:
    jwe = tokens.split_compact(COMPACT + b"\n")
    assert jwe["encrypted_key"] == "" and jwe["tag"] == "dGFn"
    tk = tokens.ClevisToken(0, (1,), jwe)
    assert tk.compact() == COMPACT and tk.pins() == "tang http://tang.test:7500"
    for bad in (b"a.b.c", b"a.b.c.d.e=", "é....".encode()):
        with pytest.raises(ImageError):
            tokens.split_compact(bad)


def test_bound_keyslot_and_token_written_together_and_removed_together(image: str) -> None:
    slot = luks.add_clevis_key(image, SECRET, BOUND, tokens.split_compact(COMPACT),
                               iterations=1000)  # fmt: skip
    (tk,) = luks.clevis_tokens(image)
    assert tk.keyslots == (slot,) and tk.compact() == COMPACT
    exported = subprocess.run(["cryptsetup", "token", "export", "--token-id", str(tk.id), image],
                              capture_output=True, check=True).stdout  # fmt: skip
    assert json.loads(exported) == tokens.token_object(slot, tokens.split_compact(COMPACT))
    luks.open_volume(image, BOUND, readonly=True, keyslot=slot).close()
    with pytest.raises(InvalidPassphrase):  # the owner's passphrase is not tried for slot 1
        luks.open_volume(image, SECRET, readonly=True, keyslot=slot)
    with pytest.raises(ImageError, match="keyslot 5 is not an active"):
        luks.open_volume(image, BOUND, readonly=True, keyslot=5)
    with pytest.raises(ImageError, match="the one the given passphrase opens"):
        luks.kill_slot(image, BOUND, slot)
    luks.kill_slot(image, SECRET, slot)
    assert luks.clevis_tokens(image) == []
    dump = subprocess.run(["cryptsetup", "luksDump", image], capture_output=True, text=True)
    assert dump.returncode == 0 and "clevis" not in dump.stdout


@pytest.mark.parametrize(
    "token",
    [
        {"type": "clevis", "keyslots": ["0"], "jwe": "not-an-object"},
        {"type": "clevis", "keyslots": ["0"], "jwe": {"protected": "!!", "iv": "", "tag": ""}},
        {"type": "clevis", "keyslots": ["0"], "jwe": {"protected": b64([1]), "iv": "x"}},
        {"type": "clevis", "keyslots": ["0"], "jwe": {"protected": "e30", "header": "x"}},
    ],
)
def test_hostile_clevis_tokens_are_one_error(image: str, token: dict[str, object]) -> None:
    edit_tokens(image, {"0": token, "1": {"type": "luks2-keyring", "keyslots": []}})
    with pytest.raises(ImageError, match=r"tokens\.0|protected header"):
        luks.clevis_tokens(image)


def test_other_token_types_are_ignored(image: str) -> None:
    edit_tokens(image, {"3": {"type": "systemd-fido2", "keyslots": ["0"], "x": 1}})
    assert luks.clevis_tokens(image) == []


def test_crypto_erase_regions_cover_every_copy_of_a_token(image: str) -> None:
    """Erase and destroy wipe luks.key_material_regions first: the clevis tokens (in both
    JSON copies) go with the keyslots, so no JWE of a destroyed disk survives."""
    luks.add_clevis_key(image, SECRET, BOUND, tokens.split_compact(COMPACT), iterations=1000)
    data = Path(image).read_bytes()
    needle = tokens.split_compact(COMPACT)["protected"].encode()
    hits, at = [], data.find(needle)
    while at >= 0:
        hits.append(at)
        at = data.find(needle, at + 1)
    assert len(hits) == 2  # primary and secondary JSON area
    regions = luks.key_material_regions(image)
    assert all(any(o <= i and i + len(needle) <= o + n for o, n in regions) for i in hits)
