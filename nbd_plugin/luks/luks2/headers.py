"""LUKS2 header copies on a descriptor: read both, use the newest valid one, write both.

Reading follows cryptsetup's ``LUKS2_disk_hdr_read``: a copy is valid when its binary header,
checksum and JSON pass every rule of ``validate``; the valid copy with the highest seqid wins.
Using one copy without the other (damaged, or older) is cryptsetup's recovery case: refused
when libblkid finds another signature on the image (``signatures``). A damaged copy is
reported (a log warning and ``warnings`` in ``info``) and repaired by the next write, which
writes both copies: primary first, then secondary, syncing after each, so a crash leaves a
valid copy with either the old or the new metadata.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from nbd_plugin.errors import ImageError
from nbd_plugin.luks.luks2 import binary as luks2
from nbd_plugin.luks.luks2.binary import BIN_SIZE, BinaryHeader, Metadata
from nbd_plugin.luks.luks2.signatures import foreign_signature
from nbd_plugin.osutil.blockdev import device_size
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


@dataclass(frozen=True)
class _Copy:
    """One header copy as cryptsetup's reader sees it (LUKS2_disk_hdr_read's states)."""

    binary: BinaryHeader | None  # None: magic, sizes or checksum refused (HDR_FAIL)
    text: str | None  # the JSON once every rule passed; None: refused (HDR_OBSOLETE)
    error: str

    @property
    def ok(self) -> bool:
        return self.text is not None


def _read_copy(fd: int, offset: int, secondary: bool) -> _Copy:
    try:
        head = luks2.BinaryHeader.unpack(pread_all(fd, BIN_SIZE, offset))
        if head.secondary != secondary:
            raise ImageError(f"{'primary' if secondary else 'secondary'} magic at {offset}")
        raw = pread_all(fd, head.hdr_size, offset)
        luks2.check_binary(head, raw, offset)
    except (ImageError, ValueError) as exc:  # an unknown checksum algorithm too
        return _Copy(None, None, str(exc))
    try:
        return _Copy(head, luks2.checked_json(head, raw), "")
    except ImageError as exc:
        return _Copy(head, None, str(exc))


def _both_copies(fd: int) -> tuple[_Copy, _Copy]:
    """The primary, and the secondary where the primary says (or, if its binary header is
    unreadable, at the first offset cryptsetup allows that holds a readable one)."""
    primary = _read_copy(fd, 0, False)
    if primary.binary is not None:
        return primary, _read_copy(fd, primary.binary.hdr_size, True)
    secondary = _Copy(None, None, "not found")
    for offset in luks2.HDR_SIZES:
        secondary = _read_copy(fd, offset, True)
        if secondary.binary is not None:
            break
    return primary, secondary


def read_header(fd: int, path: str) -> Header:
    """Both copies read and checked as cryptsetup reads them; the newest valid one wins.

    ImageError if neither copy is valid, if the valid one would need a recovery while another
    signature sits on the image, or if the image is shorter than its header and keyslots;
    UnsupportedError ("not supported by vmshield") for a valid header vmshield cannot serve.
    """
    primary, secondary = _both_copies(fd)
    if not primary.ok and not secondary.ok:
        why = (
            f"both: {primary.error}"
            if primary.error == secondary.error
            else f"primary header: {primary.error}; secondary header: {secondary.error}"
        )
        raise ImageError(
            f"{at(path)}both LUKS2 header copies are damaged ({why}); "
            "restore a header backup (cryptsetup luksHeaderRestore)"
        )
    errors = []
    if not primary.ok:
        errors.append(f"primary header: {primary.error}")
    elif not secondary.ok:
        errors.append(f"secondary header: {secondary.error}")
    used, other = (primary, secondary) if primary.ok else (secondary, primary)
    assert used.binary is not None and used.text is not None
    if other.ok and other.binary is not None and other.binary.seqid != used.binary.seqid:
        if other.binary.seqid > used.binary.seqid:
            used, other = other, used
        stale = "primary" if other is primary else "secondary"
        errors.append(f"{stale} header: older than the other copy (interrupted update)")
    assert used.binary is not None and used.text is not None
    if errors:
        _refuse_foreign_signature(fd, path)
    try:
        meta = Metadata.parse(used.text, used.binary.hdr_size)
    except ImageError as exc:  # UnsupportedError too: the header is valid, never "restore"
        raise type(exc)(f"{at(path)}{exc}") from None
    _check_size(fd, path, used.binary.hdr_size, meta)
    warnings = tuple(
        f"{at(path)}{e}; using the {'secondary' if used.binary.secondary else 'primary'} copy"
        for e in errors
    )
    for warning in warnings:
        log.warning("%s", warning)
    salt = secondary.binary.salt if secondary.ok and secondary.binary else None
    return Header(used.binary, meta, salt, warnings)


def _refuse_foreign_signature(fd: int, path: str) -> None:
    """cryptsetup recovers a copy only when nothing but LUKS is on the image (libblkid)."""
    found = foreign_signature(fd)
    if found is not None:
        raise ImageError(
            f"{at(path)}one LUKS2 header copy is invalid and the image also holds {found}: "
            "ambiguous signatures, refusing to use the other copy (as cryptsetup does); "
            "find out who owns the image before anything else"
        )


def _check_size(fd: int, path: str, hdr_size: int, meta: Metadata) -> None:
    """device_check_size: the image holds both copies and the whole keyslots area."""
    need = 2 * hdr_size + meta.keyslots_size
    total = device_size(fd)
    if total < need:
        raise ImageError(
            f"{at(path)}truncated: the image is {total} bytes, its LUKS2 header and keyslots "
            f"area need {need}"
        )


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
