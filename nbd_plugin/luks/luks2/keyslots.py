"""New LUKS2 keyslots: the KDF and its costs, a free id, and room in the keyslots area."""

from __future__ import annotations

import os
from typing import Any

from nbd_plugin.crypto import argon2 as argon
from nbd_plugin.crypto.pbkdf2 import MIN_ITERATIONS, check_hash, iterations_for
from nbd_plugin.errors import ImageError, UnsupportedError
from nbd_plugin.luks.luks2 import binary as luks2
from nbd_plugin.luks.luks2.binary import Kdf, Keyslot, Metadata

DIGEST_MS = 125  # cryptsetup's LUKS_MKD_ITERATIONS_MS
PBKDFS = ("argon2id", "argon2i", "pbkdf2")
KDF_OPTIONS = frozenset(
    ("pbkdf", "iterations", "iter_time_ms", "pbkdf_time", "pbkdf_memory", "pbkdf_parallel")
) | {"hash_spec"}


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


def free_id(meta: Metadata, wanted: int | None) -> int:
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


def free_area(meta: Metadata, hdr_size: int, size: int) -> int:
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


def kdf_from_options(default_hash: str, opts: dict[str, Any]) -> Kdf:
    """The KDF for a keyslot added to an existing image, from the caller's keyword options."""
    unknown = set(opts) - KDF_OPTIONS
    if unknown:
        raise ValueError(f"unknown LUKS2 keyslot options {sorted(unknown)}")
    return make_kdf(
        pbkdf=opts.get("pbkdf"),
        hash_spec=opts.get("hash_spec") or default_hash,
        iterations=opts.get("iterations"),
        iter_time_ms=opts.get("iter_time_ms") or 2000,
        pbkdf_time=opts.get("pbkdf_time"),
        pbkdf_memory=opts.get("pbkdf_memory"),
        pbkdf_parallel=opts.get("pbkdf_parallel"),
    )


def new_keyslot(meta: Metadata, hdr_size: int, ks_id: int, key_size: int, kdf: Kdf) -> Keyslot:
    """A keyslot like cryptsetup's (4000 stripes, sha256 AF) in the first free area."""
    size = -(-key_size * luks2.STRIPES // luks2.AREA_ALIGN) * luks2.AREA_ALIGN
    offset = free_area(meta, hdr_size, size)
    encryption = meta.segment.encryption
    return Keyslot(
        ks_id, "luks2", key_size, luks2.STRIPES, "sha256", offset, size, encryption, key_size, kdf
    )


def digest_iterations(hash_spec: str, iter_time_ms: int, forced: bool) -> int:
    """PBKDF2 iterations of a new volume-key digest: an eighth of the keyslot time, <= 125 ms."""
    if forced:
        return MIN_ITERATIONS
    ms = max(1, min(DIGEST_MS, iter_time_ms // 8))
    return max(MIN_ITERATIONS, iterations_for(hash_spec, ms))
