"""What an erase journal claims, checked against the medium before anything is certified.

A journal is a file beside the image; whoever could plant one (or a stale one from another
image with the same st_dev/st_ino) must not make erase skip work and certify it. So before
the discard step — and again on a resume past verification — the engine checks facts the
medium shows by itself, whatever the journal says:

- no LUKS header (primary or LUKS2 secondary) is left: the crypto-erase, or an overwrite
  pass over the header, really happened;
- every extent that holds blocks now lies inside the extents the journal overwrote;
- on a resume past verification, what is still allocated reads back as the final pattern.
"""

from __future__ import annotations

import os

from nbd_plugin.osutil.extents import Extent, merge

LUKS_MAGICS = (b"LUKS\xba\xbe", b"SKUL\xba\xbe")
"""LUKS1/LUKS2 primary header and the LUKS2 secondary header."""
HEADER_OFFSETS = (0, *(16384 << i for i in range(9)))
"""Where cryptsetup looks for a LUKS header: 0, and the LUKS2 secondary at 16 KiB ... 4 MiB."""


def luks_header_left(fd: int, size: int) -> int | None:
    """Offset of a LUKS header magic still on the target, None when there is none."""
    for off in HEADER_OFFSETS:
        if off + 6 <= size and os.pread(fd, 6, off) in LUKS_MAGICS:
            return off
    return None


def first_uncovered(current: list[Extent], listed: list[Extent]) -> int | None:
    """First byte of `current` outside every extent of `listed`, None if all are inside."""
    cover = merge(listed)
    for e in merge(current):
        pos, end = e.offset, e.offset + e.length
        for c in cover:
            if c.offset <= pos < c.offset + c.length:
                pos = c.offset + c.length
            if pos >= end:
                break
        if pos < end:
            return pos
    return None


def clip(extents: list[Extent], inside: list[Extent]) -> list[Extent]:
    """The parts of `extents` that lie inside `inside`."""
    out = []
    for e in extents:
        for c in merge(inside):
            lo, hi = max(e.offset, c.offset), min(e.offset + e.length, c.offset + c.length)
            if hi > lo:
                out.append(Extent(lo, hi - lo))
    return out
