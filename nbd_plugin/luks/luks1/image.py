"""LUKS1 images on files and block devices: open, create, keyslot management, info.

The ``nbd_plugin.luks.formats.Format`` module for "luks1": every function takes a descriptor
the caller opened and locked. Every change that touches a keyslot writes the key material
first, syncs, then rewrites the header sector and syncs again, so a crash leaves either the
old or the new keyslot.
"""

from __future__ import annotations

import os
from typing import Any

from nbd_plugin.crypto.registry import make_cipher
from nbd_plugin.errors import ImageError, UnsupportedError
from nbd_plugin.luks.luks1 import format as luks1
from nbd_plugin.luks.luks1.format import SECTOR, Keyslot, Luks1Header
from nbd_plugin.luks.policy import NewImage, check_removable
from nbd_plugin.luks.volume import Volume
from nbd_plugin.osutil.blockdev import device_size
from nbd_plugin.osutil.io import pread_all, pwrite_all


def read_header(fd: int, path: str = "") -> Luks1Header:
    """The header, refused (as cryptsetup's LUKS_check_device_size refuses it) when the image
    ends before the last keyslot area does."""
    header = Luks1Header.unpack(pread_all(fd, luks1.HEADER_SIZE, 0))
    need = header.keyslots_end()
    total = device_size(fd)
    if total < need:
        where = f"{path}: " if path else ""
        raise ImageError(
            f"{where}truncated: the image is {total} bytes, its LUKS1 header and keyslots "
            f"need {need}"
        )
    return header


def _payload_size(fd: int, header: Luks1Header, path: str) -> int:
    """Payload bytes; ImageError when the image ends before the payload starts."""
    total = device_size(fd)
    if total < header.payload_bytes:
        raise ImageError(
            f"{path}: truncated: the header puts the payload at byte "
            f"{header.payload_bytes} but the image is {total} bytes"
        )
    return (total - header.payload_bytes) // SECTOR * SECTOR


def unlock(fd: int, header: Luks1Header, passphrase: bytes) -> tuple[int, bytearray]:
    return luks1.unlock(header, passphrase, lambda off, n: pread_all(fd, n, off))


def create(fd: int, size: int, passphrase: bytes, new: NewImage, **opts: Any) -> Luks1Header:
    """Write a new LUKS1 container of ``size`` payload bytes to ``fd`` (an empty file)."""
    if opts:
        raise ValueError(f"LUKS1 takes no options {sorted(opts)}")
    if size <= 0 or size % SECTOR:
        raise ValueError(f"size must be a positive multiple of {SECTOR} bytes")
    key_bytes = new.key_bytes
    iterations = luks1.default_iterations(new.hash_spec, new.iterations, new.iter_time_ms)
    master_key = bytearray(os.urandom(key_bytes))
    try:
        header = luks1.new_header(
            master_key,
            cipher=new.cipher,
            mode=new.mode,
            hash_spec=new.hash_spec,
            digest_iterations=luks1.digest_iterations_for(iterations),
        )
        slot, material = luks1.make_keyslot(header, 0, master_key, passphrase, iterations)
    finally:
        master_key[:] = bytes(key_bytes)
    header = luks1.with_slot(header, 0, slot)
    # Unused keyslot areas get random bytes, like the active one: nothing tells them apart.
    for other in header.keyslots[1:]:
        pwrite_all(fd, os.urandom(other.area_bytes(key_bytes)), other.key_offset * SECTOR)
    pwrite_all(fd, material, slot.key_offset * SECTOR)
    pwrite_all(fd, header.pack(), 0)
    os.ftruncate(fd, header.payload_bytes + size)
    os.fsync(fd)
    return header


def _commit(fd: int, header: Luks1Header, material: bytes | None, slot: Keyslot) -> None:
    if material is not None:
        pwrite_all(fd, material, slot.key_offset * SECTOR)
        os.fsync(fd)
    pwrite_all(fd, header.pack(), 0)
    os.fsync(fd)


def _free_slot(header: Luks1Header, wanted: int | None) -> int:
    if wanted is not None:
        if not 0 <= wanted < luks1.NUM_KEYSLOTS:
            raise ValueError(f"keyslot must be 0-{luks1.NUM_KEYSLOTS - 1}")
        if header.keyslots[wanted].active:
            raise ImageError(f"keyslot {wanted} is in use; pick a free one or remove it first")
        return wanted
    for i, slot in enumerate(header.keyslots):
        if not slot.active:
            return i
    raise ImageError("all 8 LUKS1 keyslots are in use; remove one first")


def add_key(
    fd: int,
    passphrase: bytes,
    new_passphrase: bytes,
    *,
    slot: int | None = None,
    iterations: int | None = None,
    iter_time_ms: int = 2000,
    **opts: Any,
) -> int:
    """Add ``new_passphrase`` in a free keyslot, authorised by an existing passphrase."""
    _no_options(opts)
    header = read_header(fd)
    _, master_key = unlock(fd, header, passphrase)
    try:
        index = _free_slot(header, slot)
        iterations = luks1.default_iterations(header.hash_spec, iterations, iter_time_ms)
        new_slot, material = luks1.make_keyslot(
            header, index, master_key, new_passphrase, iterations
        )
    finally:
        master_key[:] = bytes(len(master_key))
    _commit(fd, luks1.with_slot(header, index, new_slot), material, new_slot)
    return index


def wipe_slot(fd: int, header: Luks1Header, index: int) -> Luks1Header:
    """Overwrite keyslot ``index``'s key material with random bytes and disable it."""
    old = header.keyslots[index]
    pwrite_all(fd, os.urandom(old.area_bytes(header.key_bytes)), old.key_offset * SECTOR)
    os.fsync(fd)
    disabled = Keyslot(False, 0, bytes(luks1.SALT_SIZE), old.key_offset, old.stripes)
    updated = luks1.with_slot(header, index, disabled)
    _commit(fd, updated, None, disabled)
    return updated


def remove_key(fd: int, passphrase: bytes, *, allow_last: bool = False) -> int:
    """Disable the keyslot ``passphrase`` opens. Refuses the last one unless ``allow_last``."""
    header = read_header(fd)
    index, master_key = unlock(fd, header, passphrase)
    master_key[:] = bytes(len(master_key))
    check_removable(index, len(header.active_slots()), allow_last)
    wipe_slot(fd, header, index)
    return index


def change_key(
    fd: int,
    passphrase: bytes,
    new_passphrase: bytes,
    *,
    iterations: int | None = None,
    iter_time_ms: int = 2000,
    **opts: Any,
) -> int:
    """Replace ``passphrase`` by ``new_passphrase``; returns the new keyslot index.

    The new keyslot is written (and synced) before the old one is wiped, so a crash never
    leaves the image without a working passphrase.
    """
    _no_options(opts)
    header = read_header(fd)
    old_index, master_key = unlock(fd, header, passphrase)
    try:
        iterations = luks1.default_iterations(header.hash_spec, iterations, iter_time_ms)
        try:
            index = _free_slot(header, None)
        except ImageError:
            index = old_index  # all slots full: rewrite in place (as cryptsetup does)
        new_slot, material = luks1.make_keyslot(
            header, index, master_key, new_passphrase, iterations
        )
    finally:
        master_key[:] = bytes(len(master_key))
    header = luks1.with_slot(header, index, new_slot)
    _commit(fd, header, material, new_slot)
    if index != old_index:
        wipe_slot(fd, header, old_index)
    return index


def _no_options(opts: dict[str, Any]) -> None:
    """LUKS1 keyslots are PBKDF2 only: the LUKS2 KDF options have no meaning here."""
    if opts:
        raise ValueError(f"LUKS1 keyslots take no options {sorted(opts)}")


def open_volume(
    fd: int, path: str, passphrase: bytes, readonly: bool, keyslot: int | None = None
) -> Volume:
    """Unlock ``fd`` (already locked by the caller) and describe its payload."""
    if keyslot is not None:
        raise UnsupportedError(f"{path}: LUKS1 has no tokens; open it with its passphrase")
    header = read_header(fd, path)
    size = _payload_size(fd, header, path)
    index, key = unlock(fd, header, passphrase)
    try:
        cipher = make_cipher(header.cipher_name, header.cipher_mode, bytes(key))
    finally:
        key[:] = bytes(len(key))
    return Volume(
        path,
        fd,
        "luks1",
        readonly,
        header.payload_bytes,
        size,
        SECTOR,
        0,
        1,
        cipher,
        header.uuid,
        index,
        {"cipher": f"{header.cipher_name}-{header.cipher_mode}"},
    )


def info(fd: int, path: str) -> dict[str, Any]:
    """What the header says (no passphrase needed), as plain data for --json."""
    h = read_header(fd, path)
    size = _payload_size(fd, h, path)  # shorter than its payload offset: refused, not "0 bytes"
    return {
        "path": path,
        "format": "luks1",
        "uuid": h.uuid,
        "cipher": f"{h.cipher_name}-{h.cipher_mode}",
        "key_bits": h.key_bytes * 8,
        "hash": h.hash_spec,
        "sector_size": SECTOR,
        "payload_offset": h.payload_bytes,
        "size": size,
        "mk_digest_iterations": h.mk_digest_iter,
        "keyslots": [
            {
                "slot": i,
                "active": s.active,
                "iterations": s.iterations if s.active else None,
                "key_material_offset": s.key_offset * SECTOR,
                "stripes": s.stripes,
            }
            for i, s in enumerate(h.keyslots)
        ],
    }


def key_material_regions(fd: int, path: str) -> list[tuple[int, int]]:
    """The header and every keyslot area (active or not: a disabled one may hold old keys)."""
    return read_header(fd, path).key_material_regions()
