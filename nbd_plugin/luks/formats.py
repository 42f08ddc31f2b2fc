"""The LUKS formats vmshield reads and writes, and how to tell which one an image is.

One module per format (``luks1.image``, ``luks2.image``) exposes the same functions on an
open, locked file descriptor; ``MODULES`` maps the format's name to it. Everything above
(``nbd_plugin.luks.images``) picks the module from this table, never by name lookup.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

from nbd_plugin.errors import ImageError, UnsupportedError
from nbd_plugin.luks.luks1 import format as luks1
from nbd_plugin.luks.luks1 import image as luks1_image
from nbd_plugin.luks.luks2 import binary as luks2
from nbd_plugin.luks.luks2 import image as luks2_image
from nbd_plugin.luks.policy import NewImage
from nbd_plugin.luks.volume import Volume
from nbd_plugin.osutil.io import pread_all

Region = tuple[int, int]

_MAGIC_VERSION = struct.Struct(">6sH")


class Format(Protocol):
    """What every format module provides, on a descriptor the caller opened and locked."""

    def open_volume(
        self, fd: int, path: str, passphrase: bytes, readonly: bool, keyslot: int | None = None
    ) -> Volume:
        """Unlock the image (only ``keyslot`` if given) and describe its payload;
        InvalidPassphrase if no keyslot opens."""
        ...

    def create(self, fd: int, size: int, passphrase: bytes, new: NewImage, **opts: Any) -> object:
        """Write a new container of ``size`` payload bytes to an empty file."""
        ...

    def add_key(self, fd: int, passphrase: bytes, new_passphrase: bytes, **opts: Any) -> int:
        """Add a passphrase in a free keyslot; returns the keyslot."""
        ...

    def remove_key(self, fd: int, passphrase: bytes, *, allow_last: bool = False) -> int:
        """Wipe the keyslot ``passphrase`` opens; returns it."""
        ...

    def change_key(self, fd: int, passphrase: bytes, new_passphrase: bytes, **opts: Any) -> int:
        """Replace a passphrase (new keyslot first, then the old one wiped)."""
        ...

    def info(self, fd: int, path: str) -> dict[str, Any]:
        """What the header says, as plain data (no passphrase)."""
        ...

    def key_material_regions(self, fd: int, path: str) -> list[Region]:
        """(offset, length) byte ranges of headers and keyslot areas."""
        ...


MODULES: dict[str, Format] = {"luks1": luks1_image, "luks2": luks2_image}
"""Format name -> the module that reads and writes it."""

FORMATS: tuple[str, ...] = tuple(MODULES)
"""The format names, for option choices."""


def _luks2_secondary_only(fd: int) -> bool:
    """Whether a LUKS2 secondary header sits at one of the offsets cryptsetup allows."""
    wanted = luks2.MAGIC_SECONDARY + luks2.VERSION.to_bytes(2, "big")
    return any(pread_all(fd, 8, off) == wanted for off in luks2.HDR_SIZES)


def probe_fd(fd: int, path: str) -> str:
    """The format name of the image open on ``fd``; ImageError if it is not LUKS."""
    raw = pread_all(fd, _MAGIC_VERSION.size, 0)
    if len(raw) < _MAGIC_VERSION.size:
        raise ImageError(f"{path}: truncated: {len(raw)} bytes is too short for a LUKS header")
    magic, version = _MAGIC_VERSION.unpack(raw)
    if magic == luks2.MAGIC_SECONDARY:
        raise ImageError(f"{path}: this is a LUKS2 secondary header, not an image start")
    if magic != luks1.MAGIC:
        if _luks2_secondary_only(fd):
            return "luks2"  # primary header destroyed; the LUKS2 reader falls back and says so
        raise ImageError(f"{path}: not a LUKS image (no LUKS magic at offset 0)")
    if version == 1:
        return "luks1"
    if version == 2:
        return "luks2"
    raise UnsupportedError(f"{path}: LUKS version {version} is not supported")
