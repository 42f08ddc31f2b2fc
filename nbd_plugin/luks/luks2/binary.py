"""LUKS2 on-disk format: the two binary headers, their checksum, keyslot unlock. Sans-IO.

A LUKS2 header is two copies of (4096-byte binary header + JSON area), the secondary copy
directly after the primary (LUKS2 on-disk format document, section 2). Binary header, all
integers big endian::

    offset size  field
    0      6     magic  "LUKS\\xba\\xbe" (primary) / "SKUL\\xba\\xbe" (secondary)
    6      2     version (2)
    8      8     hdr_size: binary header + JSON area, bytes (16 KiB ... 4 MiB)
    16     8     seqid: incremented on every update; the higher valid copy wins
    24     48    label
    72     32    checksum_alg ("sha256")
    104    64    salt (random per copy)
    168    40    uuid (text)
    208    48    subsystem
    256    8     hdr_offset: where this copy starts, bytes
    264    184   padding
    448    64    csum: checksum_alg over hdr_size bytes with this field zeroed
    512    3584  padding

The JSON area's model lives in ``metadata`` (re-exported here).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

from nbd_plugin.errors import ImageError, UnsupportedError
from nbd_plugin.luks.luks2 import validate
from nbd_plugin.luks.luks2.jsonfields import dump, load
from nbd_plugin.luks.luks2.metadata import (
    AREA_ALIGN,
    BIN_SIZE,
    KEYSLOT_SECTOR,
    MAX_OBJECTS,
    SECTOR_SIZES,
    Digest,
    Kdf,
    Keyslot,
    Metadata,
    Segment,
    split_spec,
)
from nbd_plugin.luks.textfields import display_text, pack_text

__all__ = [
    "AREA_ALIGN",
    "BIN_SIZE",
    "KEYSLOT_SECTOR",
    "SECTOR_SIZES",
    "BinaryHeader",
    "Digest",
    "Kdf",
    "Keyslot",
    "Metadata",
    "Segment",
    "dump",
    "parse_copy",
    "split_spec",
    "try_keyslot",
]

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
VERSION = 2
# magic, version, hdr_size, seqid, label, checksum_alg, salt, uuid, subsystem, hdr_offset,
# padding, csum
BINARY = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
CSUM_OFFSET = 448
CSUM_SIZE = 64
# The metadata sizes cryptsetup allows (binary header + JSON area).
HDR_SIZES = tuple(1 << n for n in range(14, 23))  # 16 KiB ... 4 MiB
CSUM_ALGS = ("sha256", "sha512", "sha1")
MAX_KEYSLOTS = MAX_OBJECTS
STRIPES = 4000

ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class BinaryHeader:
    """One copy's 4096-byte binary header (the checksum is computed by ``pack``)."""

    secondary: bool
    hdr_size: int
    seqid: int
    label: str
    csum_alg: str
    salt: bytes
    uuid: str
    subsystem: str
    hdr_offset: int

    def pack(self, json_area: bytes) -> bytes:
        """Binary header + JSON area (``hdr_size`` bytes) with a valid checksum."""
        if len(json_area) != self.hdr_size - BIN_SIZE:
            raise ValueError("JSON area must fill hdr_size - 4096 bytes")
        raw = bytearray(
            BINARY.pack(
                MAGIC_SECONDARY if self.secondary else MAGIC_PRIMARY,
                VERSION,
                self.hdr_size,
                self.seqid,
                pack_text(self.label, 48, "label"),
                pack_text(self.csum_alg, 32, "checksum_alg"),
                self.salt,
                pack_text(self.uuid, 40, "uuid"),
                pack_text(self.subsystem, 48, "subsystem"),
                self.hdr_offset,
                bytes(184),
                bytes(CSUM_SIZE),
            ).ljust(BIN_SIZE, b"\0")
        )
        raw += json_area
        digest = hashlib.new(self.csum_alg, raw).digest()
        raw[CSUM_OFFSET : CSUM_OFFSET + len(digest)] = digest
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes) -> BinaryHeader:
        """Parse the first 4096 bytes (the checksum is checked by ``verify``)."""
        if len(raw) < BIN_SIZE:
            raise ImageError(f"truncated: {len(raw)} bytes is too short for a LUKS2 header")
        fields = BINARY.unpack_from(raw)
        magic, version, hdr_size, seqid, label, alg, salt, uuid, subsystem, offset = fields[:10]
        if magic not in (MAGIC_PRIMARY, MAGIC_SECONDARY):
            raise ImageError("no LUKS2 magic")
        if version != VERSION:
            raise ImageError(f"version {version}, not 2")
        if hdr_size not in HDR_SIZES:
            raise ImageError(f"header size {hdr_size} is not a LUKS2 metadata size")
        csum_alg = display_text(alg)
        if csum_alg not in CSUM_ALGS:
            raise UnsupportedError(f"LUKS2 checksum algorithm {csum_alg!r} is not supported")
        return cls(
            magic == MAGIC_SECONDARY,
            hdr_size,
            seqid,
            display_text(label),
            csum_alg,
            salt,
            display_text(uuid),
            display_text(subsystem),
            offset,
        )

    def verify(self, raw: bytes) -> bool:
        """Whether ``raw`` (hdr_size bytes starting with this header) has a valid checksum."""
        if len(raw) < self.hdr_size:
            return False
        body = bytearray(raw[: self.hdr_size])
        stored = bytes(body[CSUM_OFFSET : CSUM_OFFSET + CSUM_SIZE])
        body[CSUM_OFFSET : CSUM_OFFSET + CSUM_SIZE] = bytes(CSUM_SIZE)
        digest = hashlib.new(self.csum_alg, body).digest()
        return hmac.compare_digest(stored, digest.ljust(CSUM_SIZE, b"\0"))


def check_binary(head: BinaryHeader, raw: bytes, offset: int) -> None:
    """What cryptsetup checks before the JSON (hdr_disk_sanity_check_pre, hdr_checksum_check):
    the copy says where it is, a secondary copy sits at its own hdr_size, the checksum holds.
    """
    if head.hdr_offset != offset:
        raise ImageError(f"hdr_offset {head.hdr_offset} but found at {offset}")
    if head.secondary and head.hdr_size != offset:
        raise ImageError(f"a secondary header of size {head.hdr_size} found at {offset}")
    if len(raw) < head.hdr_size:
        raise ImageError("truncated header")
    if not head.verify(raw):
        raise ImageError("checksum mismatch")


def checked_json(head: BinaryHeader, raw: bytes) -> str:
    """The copy's JSON text once it passes every rule cryptsetup checks (``validate``)."""
    text = validate.json_area(raw[BIN_SIZE : head.hdr_size])
    validate.header(load(text), head.hdr_size - BIN_SIZE)
    return text


def parse_copy(raw: bytes, expected_offset: int) -> tuple[BinaryHeader, Metadata]:
    """Parse and verify one header copy (``raw`` holds at least its hdr_size bytes)."""
    head = BinaryHeader.unpack(raw)
    check_binary(head, raw, expected_offset)
    return head, Metadata.parse(checked_json(head, raw), head.hdr_size)


def raw_payload_offset(raw: bytes) -> int:
    """Where the primary copy's JSON puts the payload, read without validation (0: unknown).

    Only for wiping a header that ``parse_copy`` refuses: never trust it otherwise.
    """
    if len(raw) < BINARY.size:
        return 0
    hdr_size = BINARY.unpack_from(raw)[2]
    if hdr_size not in HDR_SIZES or len(raw) < hdr_size:
        return 0
    try:
        doc = json.loads(raw[BIN_SIZE:hdr_size].split(b"\0", 1)[0])
        offsets = [int(seg["offset"]) for seg in doc["segments"].values()]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return 0
    return max(0, min(offsets, default=0))


def try_keyslot(
    meta: Metadata, ks: Keyslot, passphrase: bytes, read_at: ReadAt
) -> bytearray | None:
    """The volume key if ``passphrase`` opens ``ks`` (and matches its digest), else None."""
    ks.check()
    derived = ks.kdf.derive(passphrase, ks.area_key_size)
    size = ks.material_bytes()
    material = bytearray(read_at(ks.area_offset, size))
    if len(material) != size:
        raise ImageError(f"truncated: keyslot {ks.id}'s area ends past the end of the image")
    candidate = ks.unwrap(derived, material)
    material[:] = bytes(size)
    for dg in meta.digests:
        if ks.id in dg.keyslots and dg.matches(candidate):
            return candidate
    candidate[:] = bytes(len(candidate))
    return None
