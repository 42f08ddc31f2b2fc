"""LUKS2 header copies on a descriptor: read both, use the newest valid one, write both.

Reading takes the valid header copy with the highest seqid; a damaged copy is reported (a
log warning and ``warnings`` in ``info``) and repaired by the next write, which writes both
copies: primary first, then secondary, syncing after each, so a crash leaves a valid copy
with either the old or the new metadata.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from nbd_plugin.errors import ImageError
from nbd_plugin.luks.luks2 import binary as luks2
from nbd_plugin.luks.luks2.binary import BIN_SIZE, BinaryHeader, Metadata
from nbd_plugin.osutil.io import pread_all, pwrite_all

log = logging.getLogger("vmshield.luks2")


@dataclass(frozen=True)
class Header:
    """The header copy in use, the other copy's state, and the parsed metadata."""

    binary: BinaryHeader
    meta: Metadata
    secondary_salt: bytes | None  # None when the secondary copy is damaged
    warnings: tuple[str, ...]

    @property
    def hdr_size(self) -> int:
        return self.binary.hdr_size


def at(path: str) -> str:
    """Message prefix naming the image, when the caller told us its path."""
    return f"{path}: " if path else ""


def _read_copy(fd: int, offset: int) -> tuple[BinaryHeader, Metadata]:
    head = luks2.BinaryHeader.unpack(pread_all(fd, BIN_SIZE, offset))
    return luks2.parse_copy(pread_all(fd, head.hdr_size, offset), offset)


def read_header(fd: int, path: str) -> Header:
    """Both copies read and checked; the newest valid one wins. ImageError if none is valid."""
    primary: tuple[BinaryHeader, Metadata] | None = None
    secondary: tuple[BinaryHeader, Metadata] | None = None
    errors: list[str] = []
    try:
        primary = _read_copy(fd, 0)
        if primary[0].secondary:
            raise ImageError("secondary magic at offset 0")
    except (ImageError, ValueError) as exc:
        primary = None
        errors.append(f"primary header: {exc}")
    offsets = [primary[0].hdr_size] if primary else list(luks2.HDR_SIZES)
    second_error = "secondary header: not found"
    for offset in offsets:
        try:
            copy = _read_copy(fd, offset)
        except (ImageError, ValueError) as exc:
            second_error = f"secondary header at {offset}: {exc}"
            continue
        if copy[0].secondary and copy[0].hdr_size == offset:
            secondary = copy
            break
    if secondary is None:
        errors.append(second_error)
    if primary is None and secondary is None:
        raise ImageError(
            f"{at(path)}both LUKS2 header copies are damaged ({'; '.join(errors)}); "
            "restore a header backup (cryptsetup luksHeaderRestore)"
        )
    if primary and secondary and secondary[0].seqid > primary[0].seqid:
        errors.append("primary header: older than the secondary (interrupted update)")
        primary = None
    used = primary or secondary
    assert used is not None
    warnings = tuple(
        f"{at(path)}{e}; using the {'primary' if primary else 'secondary'} copy" for e in errors
    )
    for warning in warnings:
        log.warning("%s", warning)
    return Header(used[0], used[1], secondary[0].salt if secondary else None, warnings)


def write_header(fd: int, header: Header, meta: Metadata) -> Header:
    """Write ``meta`` to both copies with seqid + 1 (primary first), syncing after each."""
    area = meta.json_area()
    primary = replace(
        header.binary,
        secondary=False,
        seqid=header.binary.seqid + 1,
        hdr_offset=0,
        salt=header.binary.salt if not header.binary.secondary else os.urandom(64),
    )
    second = replace(
        primary,
        secondary=True,
        hdr_offset=primary.hdr_size,
        salt=header.secondary_salt or os.urandom(64),
    )
    pwrite_all(fd, primary.pack(area), 0)
    os.fsync(fd)
    pwrite_all(fd, second.pack(area), primary.hdr_size)
    os.fsync(fd)
    return Header(primary, meta, second.salt, ())
