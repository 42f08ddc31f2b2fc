"""Where a LUKS image keeps its key material: the byte ranges a crypto-erase must destroy.

The LUKS1 and LUKS2 readers (``formats.MODULES``) say where the headers and keyslot areas
are. A header they refuse but whose magic says LUKS (damaged, or crafted) is wiped up to the
payload offset its raw fields give, or its first 16 MiB when even that is unreadable: more
than any LUKS header cryptsetup writes by default.
"""

from __future__ import annotations

import os

from nbd_plugin.errors import ImageError, UnsupportedError
from nbd_plugin.luks.formats import MODULES, Region, probe_fd
from nbd_plugin.luks.luks1 import format as luks1
from nbd_plugin.luks.luks2 import binary as luks2
from nbd_plugin.osutil.io import pread_all

FALLBACK_BYTES = 16 << 20
"""Wiped when a damaged header does not even say where its payload starts."""


def luks_version(head: bytes) -> int | None:
    """LUKS version (1 or 2) from the first bytes of an image, None if it is not LUKS."""
    if len(head) < 8 or head[:6] != luks1.MAGIC:
        return None
    version = int.from_bytes(head[6:8], "big")
    return version if version in (1, 2) else None


def damaged_header_regions(head: bytes) -> list[Region]:
    """What to wipe when the header cannot be parsed: everything before the payload."""
    version = luks_version(head)
    if version is None:
        raise UnsupportedError("not a LUKS image: there is no key material to crypto-erase")
    if version == 1:
        end = luks1.raw_payload_bytes(head)
        least = luks1.HEADER_SIZE
    else:
        end = luks2.raw_payload_offset(head)
        least = 2 * luks2.HDR_SIZES[0]
    return [(0, max(end, least) if end else FALLBACK_BYTES)]


def _parsed_regions(path: str) -> list[Region]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return MODULES[probe_fd(fd, path)].key_material_regions(fd, path)
    finally:
        os.close(fd)


def read_head(path: str, size: int) -> bytes:
    """The bytes a header reader may need: at most 16 MiB from the start."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return pread_all(fd, min(size, FALLBACK_BYTES), 0)
    finally:
        os.close(fd)


def wipe_regions(path: str, size: int) -> list[Region]:
    """What a crypto-erase overwrites: key-material ranges clipped to ``size``, merged.

    UnsupportedError when the image is not LUKS at all.
    """
    if luks_version(read_head(path, 8)) is None:
        raise UnsupportedError(f"{path}: not a LUKS image, there is no key material to wipe")
    try:
        regions = _parsed_regions(path)
    except ImageError:  # UnsupportedError too: an unsupported header still holds key material
        regions = damaged_header_regions(read_head(path, size))
    merged: list[Region] = []
    for off, n in sorted((o, min(o + n, size) - o) for o, n in regions if o < size and n > 0):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            prev_off, prev_n = merged[-1]
            merged[-1] = (prev_off, max(prev_n, off + n - prev_off))
        else:
            merged.append((off, n))
    return merged
