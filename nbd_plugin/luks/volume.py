"""Format-independent entry points: probe, create, open, keyslots, regions.

Everything above this module (the plugin, the CLI, erase) talks to images through these
functions; the LUKS1 and LUKS2 modules below it know the bytes.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from nbd_plugin.crypto.registry import SectorCipher, make_cipher
from nbd_plugin.errors import ImageError, UnsupportedError
from nbd_plugin.luks.luks1 import format as luks1
from nbd_plugin.luks.luks1 import image as luks1_image
from nbd_plugin.osutil.locking import hold_image

FORMATS = ("luks1", "luks2")
_MAGIC_VERSION = struct.Struct(">6sH")


@dataclass
class Volume:
    """An unlocked image: where the payload is and how to en/decrypt it."""

    path: str
    fd: int
    fmt: str
    readonly: bool
    payload_offset: int  # bytes from the start of the file
    size: int  # plaintext bytes served
    sector_size: int
    iv_base: int
    iv_step: int
    cipher: SectorCipher
    uuid: str
    keyslot: int
    info: dict[str, Any] = field(default_factory=dict)

    def first_iv(self, sector: int) -> int:
        """IV of payload sector ``sector`` (counted in ``sector_size`` units)."""
        return self.iv_base + sector * self.iv_step

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_fd(path: str, readonly: bool) -> int:
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        mode = "reading" if readonly else "reading and writing"
        raise ImageError(f"{path}: permission denied opening it for {mode}") from None


def device_size(fd: int) -> int:
    """Size of a regular file or block device."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return os.lseek(fd, 0, os.SEEK_END)


def _luks2_secondary_only(fd: int) -> bool:
    """Whether a LUKS2 secondary header sits at one of the offsets cryptsetup allows."""
    from nbd_plugin.luks.luks2 import binary as luks2

    wanted = luks2.MAGIC_SECONDARY + b"\0\2"
    return any(luks1_image.read_exact(fd, off, 8) == wanted for off in luks2.HDR_SIZES)


def probe_fd(fd: int, path: str) -> str:
    raw = luks1_image.read_exact(fd, 0, _MAGIC_VERSION.size)
    if len(raw) < _MAGIC_VERSION.size:
        raise ImageError(f"{path}: truncated: {len(raw)} bytes is too short for a LUKS header")
    magic, version = _MAGIC_VERSION.unpack(raw)
    if magic == b"SKUL\xba\xbe":
        raise ImageError(f"{path}: this is a LUKS2 secondary header, not an image start")
    if magic != luks1.MAGIC:
        if _luks2_secondary_only(fd):
            return "luks2"  # primary header destroyed; luks2_image falls back and says so
        raise ImageError(f"{path}: not a LUKS image (no LUKS magic at offset 0)")
    if version == 1:
        return "luks1"
    if version == 2:
        return "luks2"
    raise UnsupportedError(f"{path}: LUKS version {version} is not supported")


def probe(path: str) -> str:
    """ "luks1" or "luks2"; ImageError if the file is not a LUKS image."""
    fd = _open_fd(path, True)
    try:
        return probe_fd(fd, path)
    finally:
        os.close(fd)


def _luks2() -> Any:
    try:
        from nbd_plugin.luks.luks2 import image as luks2_image
    except ImportError:
        raise UnsupportedError("LUKS2 images are not supported by this build") from None
    return luks2_image


def _open_luks1(fd: int, path: str, passphrase: bytes, readonly: bool) -> Volume:
    header = luks1_image.read_header(fd)
    total = device_size(fd)
    if total < header.payload_bytes:
        raise ImageError(
            f"{path}: truncated: the header puts the payload at byte "
            f"{header.payload_bytes} but the image is {total} bytes"
        )
    index, key = luks1_image.unlock(fd, header, passphrase)
    try:
        cipher = make_cipher(header.cipher_name, header.cipher_mode, bytes(key))
    finally:
        key[:] = bytes(len(key))
    size = (total - header.payload_bytes) // luks1.SECTOR * luks1.SECTOR
    return Volume(
        path,
        fd,
        "luks1",
        readonly,
        header.payload_bytes,
        size,
        luks1.SECTOR,
        0,
        1,
        cipher,
        header.uuid,
        index,
        {"cipher": f"{header.cipher_name}-{header.cipher_mode}"},
    )


def open_volume(path: str, passphrase: bytes, *, readonly: bool) -> Volume:
    """Open, lock and unlock an image. Nothing is written; a failure leaves no lock behind."""
    fd = _open_fd(path, readonly)
    try:
        hold_image(fd, path, exclusive=not readonly)
        fmt = probe_fd(fd, path)
        if fmt == "luks1":
            return _open_luks1(fd, path, passphrase, readonly)
        volume: Volume = _luks2().open_volume(fd, path, passphrase, readonly)
        return volume
    except BaseException:
        os.close(fd)
        raise


def create_image(
    path: str,
    size: int,
    passphrase: bytes,
    *,
    fmt: str = "luks1",
    cipher: str = "aes-xts-plain64",
    key_bytes: int = 64,
    hash: str = "sha256",
    iterations: int | None = None,
    iter_time_ms: int = 2000,
    **fmt_opts: Any,
) -> None:
    """Create a new image file; refuses to overwrite an existing one."""
    cipher_name, _, mode = cipher.partition("-")
    if fmt not in FORMATS:
        raise UnsupportedError(f"format {fmt!r} is not supported (use luks1 or luks2)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ImageError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        hold_image(fd, path, exclusive=True)
        if fmt == "luks1" and fmt_opts:
            raise ValueError(f"LUKS1 takes no options {sorted(fmt_opts)}")
        _module(fmt).create(
            fd,
            size,
            passphrase,
            cipher=cipher_name,
            mode=mode,
            key_bytes=key_bytes,
            hash_spec=hash,
            iterations=iterations,
            iter_time_ms=iter_time_ms,
            **fmt_opts,
        )
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _module(fmt: str) -> Any:
    return luks1_image if fmt == "luks1" else _luks2()


def _keyslot_change(path: str, operation: str, *args: Any, **opts: Any) -> int:
    """Run ``operation`` of the image's format module under the exclusive lock."""
    fd = _open_fd(path, False)
    try:
        hold_image(fd, path, exclusive=True)
        fmt = probe_fd(fd, path)
        return int(getattr(_module(fmt), operation)(fd, *args, **opts))
    finally:
        os.close(fd)


def add_key(path: str, passphrase: bytes, new_passphrase: bytes, **opts: Any) -> int:
    """Add a passphrase; returns the keyslot used."""
    return _keyslot_change(path, "add_key", passphrase, new_passphrase, **opts)


def remove_key(path: str, passphrase: bytes, *, allow_last: bool = False) -> int:
    """Remove the keyslot ``passphrase`` opens; returns its index."""
    return _keyslot_change(path, "remove_key", passphrase, allow_last=allow_last)


def change_key(path: str, passphrase: bytes, new_passphrase: bytes, **opts: Any) -> int:
    """Replace a passphrase; returns the keyslot now holding the new one."""
    return _keyslot_change(path, "change_key", passphrase, new_passphrase, **opts)


def info(path: str) -> dict[str, Any]:
    """What the header says (no passphrase needed), as plain data for --json."""
    fd = _open_fd(path, True)
    try:
        fmt = probe_fd(fd, path)
        total = device_size(fd)
        if fmt != "luks1":
            result: dict[str, Any] = _luks2().info(fd, path)
            return result
        h = luks1_image.read_header(fd)
        return {
            "path": path,
            "format": "luks1",
            "uuid": h.uuid,
            "cipher": f"{h.cipher_name}-{h.cipher_mode}",
            "key_bits": h.key_bytes * 8,
            "hash": h.hash_spec,
            "sector_size": luks1.SECTOR,
            "payload_offset": h.payload_bytes,
            "size": max(0, (total - h.payload_bytes) // luks1.SECTOR * luks1.SECTOR),
            "mk_digest_iterations": h.mk_digest_iter,
            "keyslots": [
                {
                    "slot": i,
                    "active": s.active,
                    "iterations": s.iterations if s.active else None,
                    "key_material_offset": s.key_offset * luks1.SECTOR,
                    "stripes": s.stripes,
                }
                for i, s in enumerate(h.keyslots)
            ],
        }
    finally:
        os.close(fd)


def key_material_regions(path: str) -> list[tuple[int, int]]:
    """(offset, length) byte ranges holding headers, digests and keyslot material."""
    fd = _open_fd(path, True)
    try:
        fmt = probe_fd(fd, path)
        if fmt == "luks1":
            return luks1_image.read_header(fd).key_material_regions()
        regions: list[tuple[int, int]] = _luks2().key_material_regions(fd, path)
        return regions
    finally:
        os.close(fd)


def payload_region(path: str) -> tuple[int, int]:
    """(offset, length) of the encrypted payload in bytes."""
    meta = info(path)
    return int(meta["payload_offset"]), int(meta["size"])
