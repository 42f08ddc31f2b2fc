"""LUKS2 images on files and block devices: open, create, keyslot management, info.

Reading takes the valid header copy with the highest seqid; a damaged copy is reported (a
log warning and ``warnings`` in ``info``) and repaired by the next keyslot change, which
writes both copies. Every keyslot change writes key material first and syncs, then the
primary header, then the secondary, syncing after each: a crash leaves a valid copy with
either the old or the new metadata.
"""

from __future__ import annotations

import json
import logging
import os
import uuid as uuid_mod
from dataclasses import dataclass, replace
from typing import Any

from nbd_plugin.crypto import argon2 as argon
from nbd_plugin.crypto.pbkdf2 import MIN_ITERATIONS, check_hash, iterations_for
from nbd_plugin.errors import ImageError, InvalidPassphrase, UnsupportedError
from nbd_plugin.luks.luks1.image import read_exact, write_exact
from nbd_plugin.luks.luks2 import binary as luks2
from nbd_plugin.luks.luks2.binary import (
    BIN_SIZE,
    BinaryHeader,
    Digest,
    Kdf,
    Keyslot,
    Metadata,
    Segment,
)
from nbd_plugin.luks.volume import Volume, device_size

log = logging.getLogger("vmshield.luks2")

HDR_SIZE = 16384  # cryptsetup's default metadata size
DATA_OFFSET = 16 << 20  # and data offset
DIGEST_MS = 125  # cryptsetup's LUKS_MKD_ITERATIONS_MS
PBKDFS = ("argon2id", "argon2i", "pbkdf2")


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


def _at(path: str) -> str:
    """Message prefix naming the image, when the caller told us its path."""
    return f"{path}: " if path else ""


def _read_copy(fd: int, offset: int) -> tuple[BinaryHeader, Metadata]:
    head = luks2.BinaryHeader.unpack(read_exact(fd, offset, BIN_SIZE))
    return luks2.parse_copy(read_exact(fd, offset, head.hdr_size), offset)


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
            f"{_at(path)}both LUKS2 header copies are damaged ({'; '.join(errors)}); "
            "restore a header backup (cryptsetup luksHeaderRestore)"
        )
    if primary and secondary and secondary[0].seqid > primary[0].seqid:
        errors.append("primary header: older than the secondary (interrupted update)")
        primary = None
    used = primary or secondary
    assert used is not None
    warnings = tuple(
        f"{_at(path)}{e}; using the {'primary' if primary else 'secondary'} copy" for e in errors
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
    write_exact(fd, primary.pack(area), 0)
    os.fsync(fd)
    write_exact(fd, second.pack(area), primary.hdr_size)
    os.fsync(fd)
    return Header(primary, meta, second.salt, ())


def _check_openable(header: Header, path: str) -> list[Keyslot]:
    meta = header.meta
    meta.validate(header.hdr_size)
    slots = meta.openable()
    if not slots:
        raise ImageError(f"{_at(path)}no keyslot is bound to the data segment")
    return slots


def unlock(fd: int, header: Header, passphrase: bytes, path: str = "") -> tuple[int, bytearray]:
    """(keyslot id, volume key) for the first keyslot ``passphrase`` opens."""
    slots = _check_openable(header, path)
    skipped: list[str] = []
    tried = 0
    for ks in slots:
        try:
            ks.check()
        except UnsupportedError as exc:
            skipped.append(f"keyslot {ks.id}: {exc}")
            continue
        tried += 1
        key = luks2.try_keyslot(header.meta, ks, passphrase, lambda o, n: read_exact(fd, o, n))
        if key is not None:
            return ks.id, key
    if not tried:
        raise UnsupportedError(f"{_at(path)}no keyslot can be opened here: {'; '.join(skipped)}")
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
            raise ImageError(f"{_at(path)}truncated: the segment ends at {end}, image is {total}")
    if end < seg.offset:
        raise ImageError(f"{_at(path)}truncated: data offset {seg.offset} is past the end")
    return seg.offset, (end - seg.offset) // seg.sector_size * seg.sector_size


def open_volume(fd: int, path: str, passphrase: bytes, readonly: bool) -> Volume:
    """Unlock ``fd`` (already locked by the caller) and describe its payload."""
    from nbd_plugin.crypto.registry import make_cipher

    header = read_header(fd, path)
    meta = header.meta
    seg = meta.segment
    slots = _check_openable(header, path)
    name, mode = meta.cipher_spec(slots[0].key_size)
    offset, size = _payload(header, fd, path)
    index, key = unlock(fd, header, passphrase, path)
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


# ---- creating keyslots -------------------------------------------------------------------
def make_kdf(
    *,
    pbkdf: str | None,
    hash_spec: str,
    iterations: int | None,
    iter_time_ms: int,
    pbkdf_time: int | None = None,
    pbkdf_memory: int | None = None,
    pbkdf_parallel: int | None = None,
) -> Kdf:
    """A new keyslot KDF with a fresh salt.

    ``pbkdf`` None means argon2id, except that ``iterations`` alone asks for a PBKDF2
    keyslot with that count (what the option has always meant for LUKS1). For argon2,
    ``pbkdf_time`` (or ``iterations``, like cryptsetup's --pbkdf-force-iterations) forces the
    passes, ``pbkdf_memory`` the KiB; what is not forced is calibrated to ``iter_time_ms``.
    """
    forced_argon = pbkdf_time is not None or pbkdf_memory is not None
    if pbkdf is None:
        pbkdf = "pbkdf2" if iterations is not None and not forced_argon else "argon2id"
    salt = os.urandom(32)
    if pbkdf == "pbkdf2":
        if forced_argon or pbkdf_parallel is not None:
            raise ValueError("pbkdf_time/pbkdf_memory/pbkdf_parallel are argon2 costs")
        hash_spec = check_hash(hash_spec)
        count = iterations if iterations is not None else iterations_for(hash_spec, iter_time_ms)
        if count < 1:
            raise ValueError("iterations must be positive")
        return Kdf("pbkdf2", salt, hash=hash_spec, iterations=count)
    if pbkdf not in argon.TYPES:
        raise UnsupportedError(f"PBKDF {pbkdf!r} is not supported (use {', '.join(PBKDFS)})")
    parallel = pbkdf_parallel or argon.default_parallel()
    time_cost = pbkdf_time if pbkdf_time is not None else iterations
    memory = pbkdf_memory
    if time_cost is None:
        time_cost, memory = argon.calibrate(
            pbkdf, iter_time_ms, memory or argon.default_memory_kib(), parallel
        )
    memory = memory or argon.default_memory_kib()
    argon.check_costs(pbkdf, time_cost, memory, parallel)
    return Kdf(pbkdf, salt, time=time_cost, memory=memory, cpus=parallel)


def _free_id(meta: Metadata, wanted: int | None) -> int:
    used = {ks.id for ks in meta.keyslots}
    if wanted is not None:
        if not 0 <= wanted < luks2.MAX_KEYSLOTS:
            raise ValueError(f"keyslot must be 0-{luks2.MAX_KEYSLOTS - 1}")
        if wanted in used:
            raise ImageError(f"keyslot {wanted} is in use; pick a free one or remove it first")
        return wanted
    for i in range(luks2.MAX_KEYSLOTS):
        if i not in used:
            return i
    raise ImageError(f"all {luks2.MAX_KEYSLOTS} LUKS2 keyslots are in use; remove one first")


def _free_area(meta: Metadata, hdr_size: int, size: int) -> int:
    """Lowest 4096-aligned offset in the keyslots area where ``size`` bytes are free."""
    start, end = 2 * hdr_size, 2 * hdr_size + meta.keyslots_size
    taken = sorted((ks.area_offset, ks.area_offset + ks.area_size) for ks in meta.keyslots)
    pos = start
    for a, b in taken:
        if pos + size <= a:
            break
        pos = max(pos, -(-b // luks2.AREA_ALIGN) * luks2.AREA_ALIGN)
    if pos + size > end:
        raise ImageError("no room left in the LUKS2 keyslots area; remove a keyslot first")
    return pos


def new_keyslot(meta: Metadata, hdr_size: int, ks_id: int, key_size: int, kdf: Kdf) -> Keyslot:
    size = -(-key_size * luks2.STRIPES // luks2.AREA_ALIGN) * luks2.AREA_ALIGN
    offset = _free_area(meta, hdr_size, size)
    encryption = meta.segment.encryption
    return Keyslot(
        ks_id, "luks2", key_size, luks2.STRIPES, "sha256", offset, size, encryption, key_size, kdf
    )


def _install(fd: int, header: Header, ks: Keyslot, key: bytearray, passphrase: bytes) -> Header:
    ks.check()
    derived = ks.kdf.derive(passphrase, ks.area_key_size)
    material = ks.wrap(derived, key)
    digest = header.meta.digest_for_segment()
    assert digest is not None
    meta = header.meta.with_keyslot(ks, digest.id, header.hdr_size)
    meta.json_area()  # refuse before writing anything if the metadata no longer fits
    write_exact(fd, material, ks.area_offset)
    os.fsync(fd)
    return write_header(fd, header, meta)


def _digest_iterations(hash_spec: str, kdf: Kdf, iter_time_ms: int, forced: bool) -> int:
    if forced:
        return MIN_ITERATIONS
    ms = max(1, min(DIGEST_MS, iter_time_ms // 8))
    return max(MIN_ITERATIONS, iterations_for(hash_spec, ms))


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
    sector_size: int = 4096,
    pbkdf: str | None = None,
    pbkdf_time: int | None = None,
    pbkdf_memory: int | None = None,
    pbkdf_parallel: int | None = None,
    label: str = "",
) -> Header:
    """Write a new LUKS2 container of ``size`` payload bytes to ``fd`` (an empty file).

    Layout as cryptsetup's defaults: 16 KiB metadata copies, keyslots area up to 16 MiB,
    payload at 16 MiB; one keyslot (argon2id unless asked otherwise), one pbkdf2 digest.
    """
    if sector_size not in luks2.SECTOR_SIZES:
        raise ValueError(f"sector size must be one of {luks2.SECTOR_SIZES}")
    if size <= 0 or size % sector_size:
        raise ValueError(f"size must be a positive multiple of the {sector_size}-byte sector")
    from nbd_plugin.crypto.registry import check_supported

    check_supported(cipher, mode, key_bytes)
    hash_spec = check_hash(hash_spec)
    kdf = make_kdf(
        pbkdf=pbkdf,
        hash_spec=hash_spec,
        iterations=iterations,
        iter_time_ms=iter_time_ms,
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
            _digest_iterations(hash_spec, kdf, iter_time_ms, forced),
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
    **kdf_opts: Any,
) -> int:
    """Add ``new_passphrase`` in a free keyslot, authorised by an existing passphrase."""
    header = read_header(fd, "")
    _, key = unlock(fd, header, passphrase)
    try:
        ks_id = _free_id(header.meta, slot)
        kdf = _kdf(header, kdf_opts)
        ks = new_keyslot(header.meta, header.hdr_size, ks_id, len(key), kdf)
        _install(fd, header, ks, key, new_passphrase)
    finally:
        key[:] = bytes(len(key))
    return ks_id


def _kdf(header: Header, opts: dict[str, Any]) -> Kdf:
    known = {
        "pbkdf",
        "iterations",
        "iter_time_ms",
        "pbkdf_time",
        "pbkdf_memory",
        "pbkdf_parallel",
        "hash_spec",
    }
    unknown = set(opts) - known
    if unknown:
        raise ValueError(f"unknown LUKS2 keyslot options {sorted(unknown)}")
    digest = header.meta.digest_for_segment()
    return make_kdf(
        pbkdf=opts.get("pbkdf"),
        hash_spec=opts.get("hash_spec") or (digest.hash if digest else "sha256"),
        iterations=opts.get("iterations"),
        iter_time_ms=opts.get("iter_time_ms") or 2000,
        pbkdf_time=opts.get("pbkdf_time"),
        pbkdf_memory=opts.get("pbkdf_memory"),
        pbkdf_parallel=opts.get("pbkdf_parallel"),
    )


def wipe_slot(fd: int, header: Header, ks_id: int) -> Header:
    """Overwrite keyslot ``ks_id``'s area with random bytes and drop it from the metadata."""
    ks = header.meta.keyslot(ks_id)
    write_exact(fd, os.urandom(ks.area_size), ks.area_offset)
    os.fsync(fd)
    return write_header(fd, header, header.meta.without_keyslot(ks_id, header.hdr_size))


def remove_key(fd: int, passphrase: bytes, *, allow_last: bool = False) -> int:
    """Remove the keyslot ``passphrase`` opens. Refuses the last one unless ``allow_last``."""
    header = read_header(fd, "")
    index, key = unlock(fd, header, passphrase)
    key[:] = bytes(len(key))
    if len(header.meta.openable()) == 1 and not allow_last:
        raise ImageError(
            f"keyslot {index} is the last one: removing it makes the data "
            "unrecoverable (use `vmshield image erase --method crypto` to destroy "
            "the image on purpose)"
        )
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
        ks_id = _free_id(header.meta, None)
        ks = new_keyslot(header.meta, header.hdr_size, ks_id, len(key), _kdf(header, kdf_opts))
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
    total = device_size(fd)
    size = seg.size if seg.size is not None else max(0, total - seg.offset)
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
        "size": size // seg.sector_size * seg.sector_size,
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


def check_passphrase(fd: int, passphrase: bytes) -> int:
    header = read_header(fd, "")
    index, key = unlock(fd, header, passphrase)
    key[:] = bytes(len(key))
    return index
