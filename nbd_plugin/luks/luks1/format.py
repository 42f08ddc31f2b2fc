"""LUKS1 on-disk format: header, keyslots, unlock, create and keyslot management.

Layout (LUKS1 on-disk format specification 1.2.x), all integers big endian::

    offset size  field
    0      6     magic "LUKS\\xba\\xbe"
    6      2     version (1)
    8      32    cipher-name    ("aes")
    40     32    cipher-mode    ("xts-plain64", "cbc-essiv:sha256")
    72     32    hash-spec      ("sha256")
    104    4     payload-offset (512-byte sectors)
    108    4     key-bytes
    112    20    mk-digest      PBKDF2(hash, master key, mk-digest-salt, mk-digest-iter, 20)
    132    32    mk-digest-salt
    164    4     mk-digest-iter
    168    40    uuid (text)
    208    48*8  keyslots: active, iterations, salt[32], key-material-offset (sectors), stripes

A keyslot stores AF-split(master key) encrypted with the volume's cipher under
PBKDF2(passphrase, salt, iterations); IVs count 512-byte sectors from the key material start.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import os
import struct
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass

from nbd_plugin.crypto.pbkdf2 import (
    MIN_ITERATIONS,
    check_hash,
    check_iterations,
    iterations_for,
    pbkdf2,
)
from nbd_plugin.crypto.registry import check_supported, make_cipher
from nbd_plugin.errors import ImageError, InvalidPassphrase, UnsupportedError
from nbd_plugin.luks import af
from nbd_plugin.luks.textfields import ascii_text, pack_text

MAGIC = b"LUKS\xba\xbe"
SECTOR = 512
# magic, version, cipher-name, cipher-mode, hash-spec, payload-offset, key-bytes,
# mk-digest, mk-digest-salt, mk-digest-iter, uuid
HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
# active, iterations, salt, key-material-offset, stripes
KEYSLOT = struct.Struct(">II32sII")
NUM_KEYSLOTS = 8
HEADER_SIZE = HEADER.size + NUM_KEYSLOTS * KEYSLOT.size  # 592
KEY_ENABLED = 0x00AC71F3
KEY_DISABLED = 0x0000DEAD
STRIPES = 4000
DIGEST_SIZE = 20
SALT_SIZE = 32
KEYSLOT_ALIGN_SECTORS = 8  # cryptsetup aligns keyslot areas to 4096 bytes
PAYLOAD_ALIGN_SECTORS = 2048  # and the payload to 1 MiB

ReadAt = Callable[[int, int], bytes]


def _text(raw: bytes, field: str) -> str:
    return ascii_text(raw, field, "LUKS1")


@dataclass(frozen=True)
class Keyslot:
    """One of the eight LUKS1 keyslots."""

    active: bool
    iterations: int
    salt: bytes
    key_offset: int  # sectors
    stripes: int

    def pack(self) -> bytes:
        state = KEY_ENABLED if self.active else KEY_DISABLED
        return KEYSLOT.pack(state, self.iterations, self.salt, self.key_offset, self.stripes)

    @classmethod
    def unpack(cls, raw: bytes, index: int) -> Keyslot:
        state, iterations, salt, key_offset, stripes = KEYSLOT.unpack(raw)
        if state not in (KEY_ENABLED, KEY_DISABLED):
            raise ImageError(
                f"keyslot {index} has an invalid state word {state:#010x}: header corrupt"
            )
        return cls(state == KEY_ENABLED, iterations, salt, key_offset, stripes)

    def area_bytes(self, key_bytes: int) -> int:
        """Bytes of key material on disk, rounded up to whole sectors."""
        return -(-key_bytes * self.stripes // SECTOR) * SECTOR


@dataclass(frozen=True)
class Luks1Header:
    """A parsed, sanity-checked LUKS1 header."""

    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int  # sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    keyslots: tuple[Keyslot, ...]

    def pack(self) -> bytes:
        head = HEADER.pack(
            MAGIC,
            1,
            pack_text(self.cipher_name, 32, "cipher-name"),
            pack_text(self.cipher_mode, 32, "cipher-mode"),
            pack_text(self.hash_spec, 32, "hash-spec"),
            self.payload_offset,
            self.key_bytes,
            self.mk_digest,
            self.mk_digest_salt,
            self.mk_digest_iter,
            pack_text(self.uuid, 40, "uuid"),
        )
        return head + b"".join(slot.pack() for slot in self.keyslots)

    @classmethod
    def unpack(cls, raw: bytes) -> Luks1Header:
        if len(raw) < HEADER_SIZE:
            raise ImageError(
                f"truncated: a LUKS1 header needs {HEADER_SIZE} bytes, the image has {len(raw)}"
            )
        (
            magic,
            version,
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iter,
            uuid,
        ) = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ImageError("not a LUKS image: no LUKS magic at offset 0")
        if version != 1:
            raise ImageError(f"LUKS version {version} header given to the LUKS1 parser")
        slots = tuple(
            Keyslot.unpack(
                raw[HEADER.size + i * KEYSLOT.size : HEADER.size + (i + 1) * KEYSLOT.size], i
            )
            for i in range(NUM_KEYSLOTS)
        )
        header = cls(
            _text(cipher_name, "cipher-name"),
            _text(cipher_mode, "cipher-mode"),
            _text(hash_spec, "hash-spec"),
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iter,
            _text(uuid, "uuid"),
            slots,
        )
        header.validate()
        return header

    def validate(self) -> None:
        """Reject headers whose numbers cannot be right (before any PBKDF2 work)."""
        if not 16 <= self.key_bytes <= 128 or self.key_bytes % 8:
            raise ImageError(f"LUKS1 header: key-bytes {self.key_bytes} is invalid: header corrupt")
        try:
            check_iterations(self.mk_digest_iter, self.hash_spec)
            for slot in self.keyslots:
                if slot.active:
                    check_iterations(slot.iterations, self.hash_spec)
        except ValueError as exc:
            raise ImageError(f"LUKS1 header: {exc}: header corrupt") from None
        if self.payload_offset == 0:
            raise UnsupportedError(
                "LUKS1 with a detached header (payload offset 0) is not supported"
            )
        check_hash(self.hash_spec)
        check_supported(self.cipher_name, self.cipher_mode, self.key_bytes)
        # As cryptsetup's LUKS_check_keyslots: every slot, active or not, has 4000 stripes and
        # an area between the phdr and the payload that overlaps no other slot's.
        areas = []
        for i, slot in enumerate(self.keyslots):
            if slot.stripes != STRIPES or (slot.active and slot.iterations < 1):
                raise ImageError(
                    f"keyslot {i}: iterations {slot.iterations} / stripes "
                    f"{slot.stripes} are invalid: header corrupt"
                )
            start = slot.key_offset * SECTOR
            end = start + slot.area_bytes(self.key_bytes)
            if start < HEADER_SIZE or end > self.payload_offset * SECTOR:
                raise ImageError(
                    f"keyslot {i}: key material at bytes {start}-{end} lies "
                    f"outside the header area: header corrupt"
                )
            areas.append((start, end, i))
        areas.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(areas):
            if start < end:
                raise ImageError(f"keyslots {first} and {second} overlap: header corrupt")

    def keyslots_end(self) -> int:
        """Where the last keyslot area ends, in bytes (cryptsetup's LUKS_device_sectors)."""
        return max(s.key_offset * SECTOR + s.area_bytes(self.key_bytes) for s in self.keyslots)

    @property
    def payload_bytes(self) -> int:
        return self.payload_offset * SECTOR

    def active_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.keyslots) if s.active]

    def key_material_regions(self) -> list[tuple[int, int]]:
        """Byte ranges holding key material: the header and every keyslot area."""
        regions = [(0, HEADER_SIZE)]
        for slot in self.keyslots:
            if slot.key_offset:
                regions.append((slot.key_offset * SECTOR, slot.area_bytes(self.key_bytes)))
        return regions


def raw_payload_bytes(raw: bytes) -> int:
    """The payload offset field in bytes, read without any validation (0 if too short).

    Only for wiping a header that ``Luks1Header.unpack`` refuses: never trust it otherwise.
    """
    if len(raw) < HEADER.size:
        return 0
    return int(HEADER.unpack_from(raw)[5]) * SECTOR


def _slot_cipher_apply(header: Luks1Header, key: bytes, data: bytearray, encrypt: bool) -> None:
    cipher = make_cipher(header.cipher_name, header.cipher_mode, key)
    if encrypt:
        cipher.encrypt(data, data, 0)
    else:
        cipher.decrypt(data, data, 0)


def _digest(header: Luks1Header, master_key: bytes | bytearray) -> bytes:
    return pbkdf2(
        header.hash_spec,
        bytes(master_key),
        header.mk_digest_salt,
        header.mk_digest_iter,
        DIGEST_SIZE,
    )


def try_slot(
    header: Luks1Header, index: int, passphrase: bytes, read_at: ReadAt
) -> bytearray | None:
    """The master key if ``passphrase`` opens keyslot ``index``, else None."""
    slot = header.keyslots[index]
    derived = pbkdf2(header.hash_spec, passphrase, slot.salt, slot.iterations, header.key_bytes)
    size = slot.area_bytes(header.key_bytes)
    material = bytearray(read_at(slot.key_offset * SECTOR, size))
    if len(material) != size:
        raise ImageError(
            f"truncated: keyslot {index}'s key material ends past the end of the image"
        )
    _slot_cipher_apply(header, derived, material, encrypt=False)
    candidate = af.merge(material, header.key_bytes, slot.stripes, header.hash_spec)
    material[:] = bytes(len(material))
    if hmac.compare_digest(_digest(header, candidate), header.mk_digest):
        return candidate
    candidate[:] = bytes(len(candidate))
    return None


def unlock(header: Luks1Header, passphrase: bytes, read_at: ReadAt) -> tuple[int, bytearray]:
    """(keyslot index, master key) for the first active keyslot ``passphrase`` opens."""
    for index in header.active_slots():
        key = try_slot(header, index, passphrase, read_at)
        if key is not None:
            return index, key
    raise InvalidPassphrase(
        "no keyslot opens with this passphrase (wrong passphrase, or the keyslot is damaged)"
    )


def verify_master_key(header: Luks1Header, master_key: bytes | bytearray) -> bool:
    return hmac.compare_digest(_digest(header, master_key), header.mk_digest)


def layout(key_bytes: int, stripes: int = STRIPES) -> tuple[list[int], int]:
    """Keyslot offsets and the payload offset, in sectors, as cryptsetup lays them out."""
    area = -(-key_bytes * stripes // SECTOR)
    area = -(-area // KEYSLOT_ALIGN_SECTORS) * KEYSLOT_ALIGN_SECTORS
    offsets = [KEYSLOT_ALIGN_SECTORS + i * area for i in range(NUM_KEYSLOTS)]
    end = offsets[-1] + area
    payload = -(-end // PAYLOAD_ALIGN_SECTORS) * PAYLOAD_ALIGN_SECTORS
    return offsets, payload


def make_keyslot(
    header: Luks1Header,
    index: int,
    master_key: bytes | bytearray,
    passphrase: bytes,
    iterations: int,
) -> tuple[Keyslot, bytes]:
    """A new active keyslot for ``index`` and the encrypted key material to write."""
    old = header.keyslots[index]
    salt = os.urandom(SALT_SIZE)
    derived = pbkdf2(header.hash_spec, passphrase, salt, iterations, header.key_bytes)
    material = af.split(master_key, old.stripes, header.hash_spec)
    material.extend(bytes(old.area_bytes(header.key_bytes) - len(material)))
    _slot_cipher_apply(header, derived, material, encrypt=True)
    return Keyslot(True, iterations, salt, old.key_offset, old.stripes), bytes(material)


def new_header(
    master_key: bytes | bytearray,
    *,
    cipher: str,
    mode: str,
    hash_spec: str,
    digest_iterations: int,
) -> Luks1Header:
    """A header with every keyslot disabled, for ``master_key``."""
    key_bytes = len(master_key)
    check_supported(cipher, mode, key_bytes)
    hash_spec = check_hash(hash_spec)
    offsets, payload = layout(key_bytes)
    salt = os.urandom(SALT_SIZE)
    digest = pbkdf2(hash_spec, bytes(master_key), salt, digest_iterations, DIGEST_SIZE)
    slots = tuple(Keyslot(False, 0, bytes(SALT_SIZE), off, STRIPES) for off in offsets)
    return Luks1Header(
        cipher,
        mode,
        hash_spec,
        payload,
        key_bytes,
        digest,
        salt,
        digest_iterations,
        str(uuid_mod.uuid4()),
        slots,
    )


def default_iterations(hash_spec: str, iterations: int | None, iter_time_ms: int) -> int:
    if iterations is not None:
        if iterations < 1:
            raise ValueError("iterations must be positive")
        return iterations
    return iterations_for(hash_spec, iter_time_ms)


def digest_iterations_for(slot_iterations: int) -> int:
    """cryptsetup spends about an eighth of the keyslot time on the master-key digest."""
    return max(MIN_ITERATIONS, slot_iterations // 8)


def with_slot(header: Luks1Header, index: int, slot: Keyslot) -> Luks1Header:
    slots = list(header.keyslots)
    slots[index] = slot
    return dataclasses.replace(header, keyslots=tuple(slots))
