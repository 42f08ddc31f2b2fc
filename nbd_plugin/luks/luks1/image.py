"""LUKS1 images on files and block devices: create, open, and keyslot management.

Every change that touches a keyslot writes the key material first, syncs, then rewrites the
header sector and syncs again, so a crash leaves either the old or the new keyslot.
"""

from __future__ import annotations

import os

from nbd_plugin.errors import ImageError
from nbd_plugin.luks.luks1 import format as luks1
from nbd_plugin.luks.luks1.format import SECTOR, Keyslot, Luks1Header


def read_exact(fd: int, offset: int, length: int) -> bytes:
    """pread that loops until ``length`` bytes or end of file."""
    chunks = []
    while length:
        data = os.pread(fd, length, offset)
        if not data:
            break
        chunks.append(data)
        offset += len(data)
        length -= len(data)
    return b"".join(chunks)


def write_exact(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def read_header(fd: int) -> Luks1Header:
    return Luks1Header.unpack(read_exact(fd, 0, luks1.HEADER_SIZE))


def unlock(fd: int, header: Luks1Header, passphrase: bytes) -> tuple[int, bytearray]:
    return luks1.unlock(header, passphrase, lambda off, n: read_exact(fd, off, n))


def create(
    fd: int,
    size: int,
    passphrase: bytes,
    *,
    cipher: str = "aes",
    mode: str = "xts-plain64",
    key_bytes: int = 64,
    hash_spec: str = "sha256",
    iterations: int | None = None,
    iter_time_ms: int = 2000,
) -> Luks1Header:
    """Write a new LUKS1 container of ``size`` payload bytes to ``fd`` (an empty file)."""
    if size <= 0 or size % SECTOR:
        raise ValueError(f"size must be a positive multiple of {SECTOR} bytes")
    iterations = luks1.default_iterations(hash_spec, iterations, iter_time_ms)
    master_key = bytearray(os.urandom(key_bytes))
    try:
        header = luks1.new_header(
            master_key,
            cipher=cipher,
            mode=mode,
            hash_spec=hash_spec,
            digest_iterations=luks1.digest_iterations_for(iterations),
        )
        slot, material = luks1.make_keyslot(header, 0, master_key, passphrase, iterations)
    finally:
        master_key[:] = bytes(key_bytes)
    header = luks1.with_slot(header, 0, slot)
    # Unused keyslot areas get random bytes, like the active one: nothing tells them apart.
    for other in header.keyslots[1:]:
        write_exact(fd, os.urandom(other.area_bytes(key_bytes)), other.key_offset * SECTOR)
    write_exact(fd, material, slot.key_offset * SECTOR)
    write_exact(fd, header.pack(), 0)
    os.ftruncate(fd, header.payload_bytes + size)
    os.fsync(fd)
    return header


def _commit(fd: int, header: Luks1Header, material: bytes | None, slot: Keyslot) -> None:
    if material is not None:
        write_exact(fd, material, slot.key_offset * SECTOR)
        os.fsync(fd)
    write_exact(fd, header.pack(), 0)
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
) -> int:
    """Add ``new_passphrase`` in a free keyslot, authorised by an existing passphrase."""
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
    write_exact(fd, os.urandom(old.area_bytes(header.key_bytes)), old.key_offset * SECTOR)
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
    if len(header.active_slots()) == 1 and not allow_last:
        raise ImageError(
            f"keyslot {index} is the last one: removing it makes the data "
            "unrecoverable (use `vmshield image erase --method crypto` to destroy "
            "the image on purpose)"
        )
    wipe_slot(fd, header, index)
    return index


def change_key(
    fd: int,
    passphrase: bytes,
    new_passphrase: bytes,
    *,
    iterations: int | None = None,
    iter_time_ms: int = 2000,
) -> int:
    """Replace ``passphrase`` by ``new_passphrase``; returns the new keyslot index.

    The new keyslot is written (and synced) before the old one is wiped, so a crash never
    leaves the image without a working passphrase.
    """
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


def check_passphrase(fd: int, passphrase: bytes) -> int:
    header = read_header(fd)
    index, key = unlock(fd, header, passphrase)
    key[:] = bytes(len(key))
    return index
