"""LUKS2 images on files and block devices: open, create, keyslot management, info.

The ``nbd_plugin.luks.formats.Format`` module for "luks2": every function takes a descriptor
the caller opened and locked. Every keyslot change writes key material first and syncs, then
both header copies (``headers.write_header``): a crash leaves a valid copy with either the old
or the new metadata.
"""

from __future__ import annotations

import json
import os
import uuid as uuid_mod
from typing import Any

from nbd_plugin.crypto.pbkdf2 import check_hash
from nbd_plugin.crypto.registry import check_supported, make_cipher
from nbd_plugin.errors import ImageError, InvalidPassphrase, UnsupportedError
from nbd_plugin.luks.luks2 import binary as luks2
from nbd_plugin.luks.luks2 import tokens
from nbd_plugin.luks.luks2.binary import (
    BIN_SIZE,
    BinaryHeader,
    Digest,
    Kdf,
    Keyslot,
    Metadata,
    Segment,
)
from nbd_plugin.luks.luks2.headers import Header, at, read_header, write_header
from nbd_plugin.luks.luks2.keyslots import (
    digest_iterations,
    free_id,
    kdf_from_options,
    make_kdf,
    new_keyslot,
)
from nbd_plugin.luks.policy import NewImage, check_removable
from nbd_plugin.luks.volume import Volume
from nbd_plugin.osutil.blockdev import device_size
from nbd_plugin.osutil.io import pread_all, pwrite_all

HDR_SIZE = 16384  # cryptsetup's default metadata size
DATA_OFFSET = 16 << 20  # and data offset


def _check_openable(header: Header, path: str) -> list[Keyslot]:
    meta = header.meta
    try:
        meta.validate(header.hdr_size)
    except ImageError as exc:
        raise type(exc)(f"{at(path)}{exc}") from None
    slots = meta.openable()
    if not slots:
        raise ImageError(f"{at(path)}no keyslot is bound to the data segment")
    return slots


def unlock(
    fd: int, header: Header, passphrase: bytes, path: str = "", keyslot: int | None = None
) -> tuple[int, bytearray]:
    """(keyslot id, volume key) for the first keyslot ``passphrase`` opens (only ``keyslot``
    if given: a clevis token's passphrase is for its keyslot, no other KDF need run)."""
    slots = _check_openable(header, path)
    if keyslot is not None:
        slots = [ks for ks in slots if ks.id == keyslot]
        if not slots:
            raise ImageError(f"{at(path)}keyslot {keyslot} is not an active keyslot of the disk")
    skipped: list[str] = []
    tried = 0
    for ks in slots:
        try:
            ks.check()
        except UnsupportedError as exc:
            skipped.append(f"keyslot {ks.id}: {exc}")
            continue
        tried += 1
        key = luks2.try_keyslot(header.meta, ks, passphrase, lambda o, n: pread_all(fd, n, o))
        if key is not None:
            return ks.id, key
    if not tried:
        raise UnsupportedError(f"{at(path)}no keyslot can be opened here: {'; '.join(skipped)}")
    extra = f" ({'; '.join(skipped)}: not tried)" if skipped else ""
    raise InvalidPassphrase(
        "no keyslot opens with this passphrase (wrong passphrase, or the keyslot is "
        f"damaged){extra}"
    )


def _payload(header: Header, fd: int, path: str) -> tuple[int, int]:
    seg = header.meta.segment
    total = device_size(fd)
    if seg.size is None:
        end = total
    else:
        end = seg.offset + seg.size
        if end > total:
            raise ImageError(f"{at(path)}truncated: the segment ends at {end}, image is {total}")
    if end < seg.offset:
        raise ImageError(f"{at(path)}truncated: data offset {seg.offset} is past the end")
    return seg.offset, (end - seg.offset) // seg.sector_size * seg.sector_size


def open_volume(
    fd: int, path: str, passphrase: bytes, readonly: bool, keyslot: int | None = None
) -> Volume:
    """Unlock ``fd`` (already locked by the caller) and describe its payload."""
    header = read_header(fd, path)
    meta = header.meta
    seg = meta.segment
    slots = _check_openable(header, path)
    name, mode = meta.cipher_spec(slots[0].key_size)
    offset, size = _payload(header, fd, path)
    index, key = unlock(fd, header, passphrase, path, keyslot)
    try:
        cipher = make_cipher(name, mode, bytes(key), seg.sector_size, seg.sector_size // 512)
    finally:
        key[:] = bytes(len(key))
    return Volume(
        path,
        fd,
        "luks2",
        readonly,
        offset,
        size,
        seg.sector_size,
        seg.iv_tweak,
        seg.sector_size // 512,  # dm-crypt counts IVs in 512-byte units (no iv_large_sectors)
        cipher,
        header.binary.uuid,
        index,
        {"cipher": seg.encryption, "warnings": list(header.warnings)},
    )


def _install(
    fd: int,
    header: Header,
    ks: Keyslot,
    key: bytearray,
    passphrase: bytes,
    token: dict[str, Any] | None = None,
) -> Header:
    """Write keyslot ``ks`` (and ``token`` with it, in the same header write)."""
    ks.check()
    derived = ks.kdf.derive(passphrase, ks.area_key_size)
    material = ks.wrap(derived, key)
    digest = header.meta.digest_for_segment()
    assert digest is not None
    meta = header.meta.with_keyslot(ks, digest.id, header.hdr_size)
    if token is not None:
        meta = tokens.with_token(meta, token, header.hdr_size)
    meta.json_area()  # refuse before writing anything if the metadata no longer fits
    pwrite_all(fd, material, ks.area_offset)
    os.fsync(fd)
    return write_header(fd, header, meta)


def create(
    fd: int,
    size: int,
    passphrase: bytes,
    new: NewImage,
    *,
    sector_size: int = 4096,
    pbkdf: str | None = None,
    pbkdf_time: int | None = None,
    pbkdf_memory: int | None = None,
    pbkdf_parallel: int | None = None,
    label: str = "",
    **unknown: Any,
) -> Header:
    """Write a new LUKS2 container of ``size`` payload bytes to ``fd`` (an empty file).

    Layout as cryptsetup's defaults: 16 KiB metadata copies, keyslots area up to 16 MiB,
    payload at 16 MiB; one keyslot (argon2id unless asked otherwise), one pbkdf2 digest.
    """
    if unknown:
        raise ValueError(f"unknown LUKS2 options {sorted(unknown)}")
    if sector_size not in luks2.SECTOR_SIZES:
        raise ValueError(f"sector size must be one of {luks2.SECTOR_SIZES}")
    if size <= 0 or size % sector_size:
        raise ValueError(f"size must be a positive multiple of the {sector_size}-byte sector")
    cipher, mode, key_bytes, iterations = new.cipher, new.mode, new.key_bytes, new.iterations
    check_supported(cipher, mode, key_bytes)
    hash_spec = check_hash(new.hash_spec)
    kdf = make_kdf(
        pbkdf=pbkdf,
        hash_spec=hash_spec,
        iterations=iterations,
        iter_time_ms=new.iter_time_ms,
        pbkdf_time=pbkdf_time,
        pbkdf_memory=pbkdf_memory,
        pbkdf_parallel=pbkdf_parallel,
    )
    key = bytearray(os.urandom(key_bytes))
    try:
        forced = iterations is not None or pbkdf_time is not None
        digest = Digest.make(
            0,
            key,
            hash_spec,
            digest_iterations(hash_spec, new.iter_time_ms, forced),
            os.urandom(32),
            (),
            (0,),
        )
        segment = Segment(0, DATA_OFFSET, None, 0, f"{cipher}-{mode}", sector_size)
        doc = {
            "keyslots": {},
            "tokens": {},
            "segments": {"0": segment.to_json()},
            "digests": {"0": digest.to_json()},
            "config": {
                "json_size": str(HDR_SIZE - BIN_SIZE),
                "keyslots_size": str(DATA_OFFSET - 2 * HDR_SIZE),
            },
        }
        meta = Metadata.parse(luks2.dump(doc), HDR_SIZE)
        binary = BinaryHeader(
            False, HDR_SIZE, 0, label, "sha256", os.urandom(64), str(uuid_mod.uuid4()), "", 0
        )
        empty = Header(binary, meta, None, ())
        ks = new_keyslot(meta, HDR_SIZE, 0, key_bytes, kdf)
        os.ftruncate(fd, DATA_OFFSET + size)
        header = _install(fd, empty, ks, key, passphrase)
    finally:
        key[:] = bytes(key_bytes)
    return header


def add_key(
    fd: int,
    passphrase: bytes,
    new_passphrase: bytes,
    *,
    slot: int | None = None,
    clevis_jwe: dict[str, str] | None = None,
    **kdf_opts: Any,
) -> int:
    """Add ``new_passphrase`` in a free keyslot, authorised by an existing passphrase;
    with ``clevis_jwe`` (the passphrase encrypted by clevis), its clevis token too."""
    header = read_header(fd, "")
    _, key = unlock(fd, header, passphrase)
    try:
        ks_id = free_id(header.meta, slot)
        kdf = kdf_from_options(_digest_hash(header), kdf_opts)
        ks = new_keyslot(header.meta, header.hdr_size, ks_id, len(key), kdf)
        token = None if clevis_jwe is None else tokens.token_object(ks_id, clevis_jwe)
        _install(fd, header, ks, key, new_passphrase, token)
    finally:
        key[:] = bytes(len(key))
    return ks_id


def _digest_hash(header: Header) -> str:
    """New keyslots default to the hash of the segment's digest."""
    digest = header.meta.digest_for_segment()
    return digest.hash if digest else "sha256"


def wipe_slot(fd: int, header: Header, ks_id: int) -> Header:
    """Overwrite keyslot ``ks_id``'s area with random bytes and drop it from the metadata."""
    ks = header.meta.keyslot(ks_id)
    pwrite_all(fd, os.urandom(ks.area_size), ks.area_offset)
    os.fsync(fd)
    return write_header(fd, header, header.meta.without_keyslot(ks_id, header.hdr_size))


def kill_slot(fd: int, passphrase: bytes, ks_id: int) -> int:
    """Remove keyslot ``ks_id`` (and the clevis tokens of only it), authorised by the
    passphrase of another keyslot (``cryptsetup luksKillSlot``); never the last one."""
    header = read_header(fd, "")
    if ks_id not in {ks.id for ks in header.meta.keyslots}:
        raise ImageError(f"keyslot {ks_id} is not in use")
    index, key = unlock(fd, header, passphrase)
    key[:] = bytes(len(key))
    if index == ks_id:
        raise ImageError(f"keyslot {ks_id} is the one the given passphrase opens; keeping it")
    wipe_slot(fd, header, ks_id)
    return ks_id


def set_clevis_jwe(fd: int, token_id: int, jwe: dict[str, str]) -> None:
    """Replace the JWE of clevis token ``token_id`` (its keyslot and passphrase stay)."""
    header = read_header(fd, "")
    write_header(fd, header, tokens.with_jwe(header.meta, token_id, jwe, header.hdr_size))


def clevis_tokens(fd: int, path: str) -> list[tokens.ClevisToken]:
    """The clevis tokens in the header (no passphrase needed)."""
    return tokens.clevis_tokens(read_header(fd, path).meta)


def remove_key(fd: int, passphrase: bytes, *, allow_last: bool = False) -> int:
    """Remove the keyslot ``passphrase`` opens. Refuses the last one unless ``allow_last``."""
    header = read_header(fd, "")
    index, key = unlock(fd, header, passphrase)
    key[:] = bytes(len(key))
    check_removable(index, len(header.meta.openable()), allow_last)
    wipe_slot(fd, header, index)
    return index


def change_key(fd: int, passphrase: bytes, new_passphrase: bytes, **kdf_opts: Any) -> int:
    """Replace ``passphrase`` by ``new_passphrase``; returns the new keyslot id.

    The new keyslot is written (and synced) before the old one is wiped, so a crash never
    leaves the image without a working passphrase.
    """
    header = read_header(fd, "")
    old, key = unlock(fd, header, passphrase)
    try:
        ks_id = free_id(header.meta, None)
        ks = new_keyslot(
            header.meta,
            header.hdr_size,
            ks_id,
            len(key),
            kdf_from_options(_digest_hash(header), kdf_opts),
        )
        header = _install(fd, header, ks, key, new_passphrase)
    finally:
        key[:] = bytes(len(key))
    wipe_slot(fd, header, old)
    return ks_id


# ---- read-only views ---------------------------------------------------------------------
def _kdf_info(kdf: Kdf) -> dict[str, Any]:
    if kdf.type == "pbkdf2":
        return {"kdf": "pbkdf2", "hash": kdf.hash, "iterations": kdf.iterations}
    return {"kdf": kdf.type, "time": kdf.time, "memory_kib": kdf.memory, "parallel": kdf.cpus}


def info(fd: int, path: str) -> dict[str, Any]:
    header = read_header(fd, path)
    meta = header.meta
    seg = meta.segment
    _, size = _payload(header, fd, path)  # a payload past the end is refused, not "0 bytes"
    keyslots = [
        {
            "slot": ks.id,
            "type": ks.type,
            "active": True,
            "key_bits": ks.key_size * 8,
            "priority": ks.priority,
            "key_material_offset": ks.area_offset,
            "area_size": ks.area_size,
            "stripes": ks.stripes,
            **_kdf_info(ks.kdf),
        }
        for ks in meta.keyslots
    ]
    return {
        "path": path,
        "format": "luks2",
        "uuid": header.binary.uuid,
        "label": header.binary.label,
        "cipher": seg.encryption,
        "key_bits": meta.keyslots[0].key_size * 8 if meta.keyslots else None,
        "sector_size": seg.sector_size,
        "iv_tweak": seg.iv_tweak,
        "payload_offset": seg.offset,
        "size": size,
        "header_size": header.hdr_size,
        "seqid": header.binary.seqid,
        "header_copy": "secondary" if header.binary.secondary else "primary",
        "warnings": list(header.warnings),
        "keyslots": keyslots,
        "tokens": len(json.loads(meta.text).get("tokens", {})),
    }


def key_material_regions(fd: int, path: str) -> list[tuple[int, int]]:
    """Both header copies and the whole keyslots area (old keys may linger in free parts)."""
    header = read_header(fd, path)
    hdr = header.hdr_size
    return [(0, hdr), (hdr, hdr), (2 * hdr, header.meta.keyslots_size)]
