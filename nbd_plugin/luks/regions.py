"""Where a LUKS image keeps its key material: the byte ranges a crypto-erase must destroy.

The contract is `nbd_plugin.luks.volume.key_material_regions(path)`; `key_material_regions` here
uses it when the spine provides it and falls back to this module's own parsers otherwise
(LUKS1 from the on-disk format specification 1.2; LUKS2 from its on-disk format document).
A header we cannot parse but whose magic says LUKS is wiped up to its payload offset, or its
first 16 MiB when even that is unreadable: more than any LUKS header cryptsetup writes.
"""

from __future__ import annotations

import importlib
import json
import struct
from collections.abc import Callable
from typing import cast

from nbd_plugin.errors import ImageError, UnsupportedError

LUKS_MAGIC = b"LUKS\xba\xbe"
SECTOR = 512
# LUKS1 phdr (big endian): magic[6] version u16 cipher-name[32] cipher-mode[32] hash-spec[32]
# payload-offset u32 key-bytes u32 mk-digest[20] mk-digest-salt[32] mk-digest-iter u32 uuid[40]
LUKS1_PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
# keyslot: active u32, iterations u32, salt[32], key-material-offset u32, stripes u32
LUKS1_KEYSLOT = struct.Struct(">II32sII")
LUKS1_KEYSLOTS = 8
LUKS1_HEADER_BYTES = LUKS1_PHDR.size + LUKS1_KEYSLOTS * LUKS1_KEYSLOT.size  # 592
# LUKS2 binary header: magic[6] version u16 hdr_size u64 seqid u64 label[48] csum_alg[32]
# salt[64] uuid[40] subsystem[48] hdr_offset u64 ...; JSON follows at 4096 up to hdr_size.
LUKS2_BINHDR = struct.Struct(">6sHQQ48s32s64s40s48sQ")
LUKS2_BINHDR_BYTES = 4096
FALLBACK_BYTES = 16 << 20

Region = tuple[int, int]


def probe(head: bytes) -> int | None:
    """LUKS version (1 or 2) from the first bytes of an image, None if it is not LUKS."""
    if len(head) < 8 or head[:6] != LUKS_MAGIC:
        return None
    version = int.from_bytes(head[6:8], "big")
    return version if version in (1, 2) else None


def _round_up(n: int, unit: int) -> int:
    return n + (-n % unit)


def luks1_regions(head: bytes) -> list[Region]:
    """The phdr and all eight keyslot areas (active or not: a disabled slot may hold old keys)."""
    if len(head) < LUKS1_HEADER_BYTES:
        raise ImageError("LUKS1 header truncated")
    phdr = LUKS1_PHDR.unpack_from(head, 0)
    payload_offset, key_bytes = phdr[5], phdr[6]
    regions: list[Region] = [(0, _round_up(LUKS1_HEADER_BYTES, SECTOR))]
    for i in range(LUKS1_KEYSLOTS):
        slot = LUKS1_KEYSLOT.unpack_from(head, LUKS1_PHDR.size + i * LUKS1_KEYSLOT.size)
        km_offset, stripes = slot[3], slot[4]
        if km_offset == 0 or stripes == 0:
            continue
        regions.append((km_offset * SECTOR, _round_up(key_bytes * stripes, SECTOR)))
    if payload_offset == 0 or any(off + n > payload_offset * SECTOR for off, n in regions):
        # Keyslots overlapping the payload make no sense: do not trust this header's numbers.
        raise ImageError("LUKS1 header describes keyslots outside its header area")
    return regions


def luks2_regions(head: bytes) -> list[Region]:
    """Both binary headers with their JSON areas, and every keyslot's area from the JSON."""
    hdr = LUKS2_BINHDR.unpack_from(head, 0)
    hdr_size = hdr[2]
    if hdr_size < LUKS2_BINHDR_BYTES or hdr_size > len(head):
        raise ImageError(f"LUKS2 header size {hdr_size} is implausible")
    text = head[LUKS2_BINHDR_BYTES:hdr_size].split(b"\0", 1)[0]
    try:
        meta = json.loads(text)
        areas = [
            (int(ks["area"]["offset"]), int(ks["area"]["size"]))
            for ks in meta.get("keyslots", {}).values()
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ImageError(f"LUKS2 JSON metadata unreadable: {e}") from None
    return [(0, 2 * hdr_size), *areas]


def payload_offset(head: bytes) -> int | None:
    """Byte offset of the encrypted payload, if the header says so readably."""
    version = probe(head)
    try:
        if version == 1:
            return int(LUKS1_PHDR.unpack_from(head, 0)[5]) * SECTOR
        if version == 2:
            hdr_size = LUKS2_BINHDR.unpack_from(head, 0)[2]
            meta = json.loads(head[LUKS2_BINHDR_BYTES:hdr_size].split(b"\0", 1)[0])
            return min(int(s["offset"]) for s in meta["segments"].values())
    except (ValueError, KeyError, TypeError, struct.error):
        return None
    return None


def own_regions(head: bytes) -> list[Region]:
    """Key-material regions from our own parsers, with the generic fallback."""
    version = probe(head)
    if version is None:
        raise UnsupportedError("not a LUKS image: there is no key material to crypto-erase")
    try:
        return luks1_regions(head) if version == 1 else luks2_regions(head)
    except (ImageError, struct.error):
        end = payload_offset(head)
        return [(0, end if end else FALLBACK_BYTES)]


def _contract() -> Callable[[str], list[Region]] | None:
    try:
        container = importlib.import_module("nbd_plugin.luks.volume")
    except ImportError:
        return None
    fn = getattr(container, "key_material_regions", None)
    return cast("Callable[[str], list[Region]] | None", fn)


def read_head(path: str, size: int) -> bytes:
    """The bytes a header parser may need: at most 16 MiB from the start."""
    with open(path, "rb") as f:
        return f.read(min(size, FALLBACK_BYTES))


def key_material_regions(path: str, size: int) -> list[Region]:
    """(offset, length) ranges holding key material, clipped to `size`, sorted and merged.

    UnsupportedError when the image is not LUKS at all.
    """
    if probe(read_head(path, 8)) is None:
        raise UnsupportedError(f"{path}: not a LUKS image, there is no key material to wipe")
    regions: list[Region] | None = None
    contract = _contract()
    if contract is not None:
        try:
            regions = list(contract(path))
        except (ImageError, NotImplementedError, ImportError):
            regions = None  # e.g. LUKS2 before the spine supports it
    if regions is None:
        regions = own_regions(read_head(path, size))
    merged: list[Region] = []
    for off, n in sorted((o, min(o + n, size) - o) for o, n in regions if o < size and n > 0):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            prev_off, prev_n = merged[-1]
            merged[-1] = (prev_off, max(prev_n, off + n - prev_off))
        else:
            merged.append((off, n))
    return merged
