"""LUKS2 JSON metadata as frozen dataclasses over the verbatim document. Sans-IO.

The JSON object has ``keyslots``, ``tokens``, ``segments``, ``digests`` and ``config``
(LUKS2 on-disk format document, section 3); 64-bit numbers are strings. ``Metadata`` keeps
the document as text and re-serialises it only where a keyslot is added or removed, so
tokens and fields this module does not know survive untouched. Hostile input becomes
ImageError naming the field, never KeyError or TypeError.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbd_plugin.crypto import argon2 as argon
from nbd_plugin.crypto.pbkdf2 import check_hash, check_iterations, pbkdf2
from nbd_plugin.crypto.registry import check_supported, make_cipher
from nbd_plugin.errors import ImageError
from nbd_plugin.luks import af
from nbd_plugin.luks.luks2 import jsonfields as jf
from nbd_plugin.luks.luks2 import validate

BIN_SIZE = 4096  # the binary header before each JSON area
KEYSLOT_SECTOR = 512  # keyslot areas are always encrypted in 512-byte sectors from IV 0
SECTOR_SIZES = (512, 1024, 2048, 4096)
SALT_SIZE = 32  # keyslot KDF and digest salts (cryptsetup's LUKS_SALTSIZE)
MIN_DIGEST_SIZE = 20  # LUKS_DIGESTSIZE: a digest is this long (LUKS1-converted) or its hash's
MAX_DIGEST_SIZE = 64
MAX_OBJECTS = 32  # keyslots, tokens, segments (LUKS2_OBJECTS_MAX)
MAX_KEYSLOTS_SIZE = 128 << 20  # LUKS2_MAX_KEYSLOTS_SIZE
AREA_ALIGN = 4096
MAX_STRIPES = 65536


def split_spec(spec: str) -> tuple[str, str]:
    """ "aes-xts-plain64" -> ("aes", "xts-plain64")."""
    cipher, _, mode = spec.partition("-")
    return cipher, mode


@dataclass(frozen=True)
class Kdf:
    """A keyslot's key derivation: pbkdf2 (hash, iterations) or argon2 (time, memory, cpus)."""

    type: str
    salt: bytes
    hash: str = "sha256"
    iterations: int = 0
    time: int = 0
    memory: int = 0
    cpus: int = 0

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> Kdf:
        kind = jf.text(obj, "type", where)
        salt = jf.b64(obj, "salt", where)
        if kind in ("pbkdf2", *argon.TYPES) and len(salt) != SALT_SIZE:
            raise ImageError(f"LUKS2 JSON: {where}.salt is {len(salt)} bytes, not {SALT_SIZE}")
        if kind == "pbkdf2":
            return cls(
                kind,
                salt,
                hash=jf.text(obj, "hash", where),
                iterations=jf.u32(obj, "iterations", where),
            )
        if kind in argon.TYPES:
            return cls(
                kind,
                salt,
                time=jf.u32(obj, "time", where),
                memory=jf.u32(obj, "memory", where),
                cpus=jf.u32(obj, "cpus", where),
            )
        return cls(kind, salt)  # unknown: kept, refused by check()

    def to_json(self) -> dict[str, Any]:
        if self.type == "pbkdf2":
            return {
                "type": "pbkdf2",
                "hash": self.hash,
                "iterations": self.iterations,
                "salt": jf.b64s(self.salt),
            }
        return {
            "type": self.type,
            "time": self.time,
            "memory": self.memory,
            "cpus": self.cpus,
            "salt": jf.b64s(self.salt),
        }

    def check(self) -> None:
        """UnsupportedError / ImageError before any expensive work."""
        try:
            if self.type == "pbkdf2":
                check_hash(self.hash)
                check_iterations(self.iterations, self.hash)
            else:
                argon.check_costs(self.type, self.time, self.memory, self.cpus)
        except ValueError as exc:
            raise ImageError(f"{exc}: header corrupt") from None

    def derive(self, passphrase: bytes, length: int) -> bytes:
        self.check()
        if self.type == "pbkdf2":
            return pbkdf2(self.hash, passphrase, self.salt, self.iterations, length)
        return argon.derive(
            self.type, passphrase, self.salt, self.time, self.memory, self.cpus, length
        )


@dataclass(frozen=True)
class Keyslot:
    """A ``luks2``-type keyslot: AF-split volume key, encrypted in a raw area."""

    id: int
    type: str
    key_size: int
    stripes: int
    af_hash: str
    area_offset: int
    area_size: int
    area_encryption: str
    area_key_size: int
    kdf: Kdf
    priority: int = 1  # 0 ignore, 1 normal, 2 high

    @classmethod
    def from_json(cls, ks_id: int, obj: dict[str, Any]) -> Keyslot:
        where = f"keyslots.{ks_id}"
        kind = jf.text(obj, "type", where)
        area = jf.obj(obj, "area", where)
        if kind != "luks2":  # e.g. "reencrypt": keep its area, never try to open it
            return cls(
                ks_id,
                kind,
                0,
                0,
                "",
                jf.u64(area, "offset", where),
                jf.u64(area, "size", where),
                "",
                0,
                Kdf("none", b""),
                0,
            )
        afo = jf.obj(obj, "af", where)  # af type luks1, area type raw: see validate
        priority = obj.get("priority", 1)
        return cls(
            ks_id,
            kind,
            jf.u32(obj, "key_size", where),
            jf.u32(afo, "stripes", f"{where}.af"),
            jf.text(afo, "hash", f"{where}.af"),
            jf.u64(area, "offset", f"{where}.area"),
            jf.u64(area, "size", f"{where}.area"),
            jf.text(area, "encryption", f"{where}.area"),
            jf.u32(area, "key_size", f"{where}.area"),
            Kdf.from_json(jf.obj(obj, "kdf", where), f"{where}.kdf"),
            priority if isinstance(priority, int) else 1,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "luks2",
            "key_size": self.key_size,
            "af": {"type": "luks1", "stripes": self.stripes, "hash": self.af_hash},
            "area": {
                "type": "raw",
                "offset": str(self.area_offset),
                "size": str(self.area_size),
                "encryption": self.area_encryption,
                "key_size": self.area_key_size,
            },
            "kdf": self.kdf.to_json(),
        }

    def material_bytes(self) -> int:
        return -(-self.key_size * self.stripes // KEYSLOT_SECTOR) * KEYSLOT_SECTOR

    def check(self) -> None:
        """Refuse unsupported KDFs/ciphers and impossible sizes before any KDF work."""
        if not 1 <= self.stripes <= 65536 or not 16 <= self.key_size <= 128:
            raise ImageError(f"keyslot {self.id}: key size / stripes invalid: header corrupt")
        if self.material_bytes() > self.area_size:
            raise ImageError(f"keyslot {self.id}: key material larger than its area")
        check_hash(self.af_hash)
        name, mode = split_spec(self.area_encryption)
        check_supported(name, mode, self.area_key_size)
        self.kdf.check()

    def unwrap(self, derived: bytes, material: bytearray) -> bytearray:
        """Decrypt the area in place and AF-merge it into a candidate volume key."""
        name, mode = split_spec(self.area_encryption)
        make_cipher(name, mode, derived).decrypt(material, material, 0)
        return af.merge(material, self.key_size, self.stripes, self.af_hash)

    def wrap(self, derived: bytes, volume_key: bytes | bytearray) -> bytearray:
        """AF-split and encrypt ``volume_key``: the bytes for the whole area."""
        material = af.split(volume_key, self.stripes, self.af_hash)
        material.extend(bytes(self.area_size - len(material)))
        name, mode = split_spec(self.area_encryption)
        make_cipher(name, mode, derived).encrypt(material, material, 0)
        return material


@dataclass(frozen=True)
class Segment:
    """The ``crypt`` data segment: where the payload is and how it is encrypted."""

    id: int
    offset: int
    size: int | None  # None = "dynamic": to the end of the device
    iv_tweak: int
    encryption: str
    sector_size: int

    @classmethod
    def from_json(cls, seg_id: int, obj: dict[str, Any]) -> Segment:
        where = f"segments.{seg_id}"
        jf.require_type(obj, where, "crypt")
        if "integrity" in obj:
            raise jf.unsupported("LUKS2 with authenticated encryption (integrity)")
        size = None if obj.get("size") == "dynamic" else jf.u64(obj, "size", where)
        sector = jf.u32(obj, "sector_size", where)
        if sector not in SECTOR_SIZES:
            raise ImageError(f"LUKS2 segment sector size {sector} is invalid")
        offset = jf.u64(obj, "offset", where)
        if offset % 512 or (size is not None and (size == 0 or size % sector)):
            raise ImageError(f"LUKS2 {where}: offset {offset} / size {size} are not aligned")
        iv_tweak = jf.u64(obj, "iv_tweak", where)
        return cls(seg_id, offset, size, iv_tweak, jf.text(obj, "encryption", where), sector)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "crypt",
            "offset": str(self.offset),
            "size": "dynamic" if self.size is None else str(self.size),
            "iv_tweak": str(self.iv_tweak),
            "encryption": self.encryption,
            "sector_size": self.sector_size,
        }


@dataclass(frozen=True)
class Digest:
    """A pbkdf2 digest of the volume key, binding keyslots to segments."""

    id: int
    keyslots: tuple[int, ...]
    segments: tuple[int, ...]
    hash: str
    iterations: int
    salt: bytes
    digest: bytes

    @classmethod
    def from_json(cls, dg_id: int, obj: dict[str, Any]) -> Digest:
        where = f"digests.{dg_id}"
        jf.require_type(obj, where, "pbkdf2")
        salt, value = jf.b64(obj, "salt", where), jf.b64(obj, "digest", where)
        if len(salt) != SALT_SIZE or not MIN_DIGEST_SIZE <= len(value) <= MAX_DIGEST_SIZE:
            raise ImageError(
                f"LUKS2 {where}: salt of {len(salt)} / digest of {len(value)} bytes: header corrupt"
            )
        return cls(
            dg_id,
            jf.ids(obj, "keyslots", where),
            jf.ids(obj, "segments", where),
            jf.text(obj, "hash", where),
            jf.u32(obj, "iterations", where),
            salt,
            value,
        )

    @classmethod
    def make(
        cls,
        dg_id: int,
        key: bytes | bytearray,
        hash_name: str,
        iterations: int,
        salt: bytes,
        keyslots: tuple[int, ...],
        segments: tuple[int, ...],
    ) -> Digest:
        size = hashlib.new(check_hash(hash_name)).digest_size
        value = pbkdf2(hash_name, bytes(key), salt, iterations, size)
        return cls(dg_id, keyslots, segments, hash_name, iterations, salt, value)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "pbkdf2",
            "keyslots": [str(k) for k in self.keyslots],
            "segments": [str(s) for s in self.segments],
            "hash": self.hash,
            "iterations": self.iterations,
            "salt": jf.b64s(self.salt),
            "digest": jf.b64s(self.digest),
        }

    def check(self) -> None:
        """The stored digest is as long as its hash (or LUKS1's 20 bytes), as cryptsetup asks.

        A shorter one would compare only a prefix: "digest": "" matched every key.
        """
        size = hashlib.new(check_hash(self.hash)).digest_size
        if len(self.digest) not in (MIN_DIGEST_SIZE, size):
            raise ImageError(
                f"LUKS2 digest {self.id} is {len(self.digest)} bytes, its hash {self.hash} "
                f"gives {size}: header corrupt"
            )
        try:
            check_iterations(self.iterations, self.hash)
        except ValueError as exc:
            raise ImageError(f"LUKS2 digest {self.id}: {exc}: header corrupt") from None

    def matches(self, key: bytes | bytearray) -> bool:
        self.check()
        value = pbkdf2(self.hash, bytes(key), self.salt, self.iterations, len(self.digest))
        return hmac.compare_digest(value, self.digest)


@dataclass(frozen=True)
class Metadata:
    """The JSON document (kept verbatim as text) and the parts of it this module uses."""

    text: str
    json_size: int
    keyslots_size: int
    keyslots: tuple[Keyslot, ...]
    segment: Segment
    digests: tuple[Digest, ...]
    requirements: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, hdr_size: int) -> Metadata:
        """Check ``text`` against cryptsetup's rules (``validate``: ImageError when it refuses
        them), then take the parts vmshield implements (UnsupportedError for the others)."""
        doc = jf.load(text)
        validate.header(doc, hdr_size - BIN_SIZE)
        config = doc["config"]
        mandatory = validate.requirements(doc)
        segments = jf.id_map(doc, "segments", MAX_OBJECTS)
        reencrypt = [m for m in mandatory if "reencrypt" in m]
        if len(segments) != 1 or reencrypt:
            raise jf.unsupported(
                f"a LUKS2 reencryption in progress or interrupted ({len(segments)} segments"
                f"{', requirement ' + ', '.join(reencrypt) if reencrypt else ''}); "
                "finish it with cryptsetup reencrypt first"
            )
        ((seg_id, seg_obj),) = segments.items()
        keyslots = jf.id_map(doc, "keyslots", MAX_OBJECTS)
        jf.id_map(doc, "tokens", MAX_OBJECTS)
        digests = jf.id_map(doc, "digests", jf.MAX_ID)
        meta = cls(
            text,
            int(config["json_size"]),
            int(config["keyslots_size"]),
            tuple(Keyslot.from_json(k, v) for k, v in sorted(keyslots.items())),
            Segment.from_json(seg_id, seg_obj),
            tuple(Digest.from_json(k, v) for k, v in sorted(digests.items())),
            tuple(mandatory),
        )
        seg = meta.segment
        if seg.offset % seg.sector_size:
            raise ImageError(f"LUKS2 data offset {seg.offset} is not sector aligned")
        return meta

    def validate(self, hdr_size: int) -> None:
        """What must hold before a passphrase is tried (parse already checked the layout)."""
        if self.requirements:
            raise jf.unsupported(f"LUKS2 requirements {', '.join(self.requirements)}")
        if self.segment.offset == 0:
            raise jf.unsupported("a detached LUKS2 header (data offset 0)")
        if split_spec(self.segment.encryption)[0] == "cipher_null":
            raise jf.unsupported("LUKS2 with cipher_null (no encryption)")
        digest = self.digest_for_segment()
        if not digest:
            raise ImageError("LUKS2: no digest covers the data segment: header corrupt")
        digest.check()

    def cipher_spec(self, key_size: int) -> tuple[str, str]:
        name, mode = split_spec(self.segment.encryption)
        check_supported(name, mode, key_size)
        return name, mode

    def digest_for_segment(self) -> Digest | None:
        for dg in self.digests:
            if self.segment.id in dg.segments:
                return dg
        return None

    def openable(self) -> list[Keyslot]:
        """luks2 keyslots bound to the segment's digest, high priority first, skipping 0."""
        dg = self.digest_for_segment()
        slots = [
            ks
            for ks in self.keyslots
            if ks.type == "luks2" and dg is not None and ks.id in dg.keyslots and ks.priority
        ]
        return sorted(slots, key=lambda ks: -ks.priority)

    def keyslot(self, ks_id: int) -> Keyslot:
        for ks in self.keyslots:
            if ks.id == ks_id:
                return ks
        raise KeyError(ks_id)

    def _edited(self, edit: Callable[[dict[str, Any]], None], hdr_size: int) -> Metadata:
        doc = jf.load(self.text)  # a fresh copy, nesting already bounded
        edit(doc)
        return Metadata.parse(jf.dump(doc), hdr_size)

    def with_keyslot(self, ks: Keyslot, digest_id: int, hdr_size: int) -> Metadata:
        """A copy with ``ks`` added and bound to digest ``digest_id``."""

        def edit(doc: dict[str, Any]) -> None:
            doc["keyslots"][str(ks.id)] = ks.to_json()
            doc["digests"][str(digest_id)]["keyslots"].append(str(ks.id))

        return self._edited(edit, hdr_size)

    def without_keyslot(self, ks_id: int, hdr_size: int) -> Metadata:
        """A copy without keyslot ``ks_id``; digests and tokens stop referring to it, and a
        clevis token left with no keyslot goes with it (its JWE opened only this one)."""
        key = str(ks_id)

        def edit(doc: dict[str, Any]) -> None:
            del doc["keyslots"][key]
            for section in ("digests", "tokens"):
                for obj in doc[section].values():
                    if isinstance(obj, dict) and isinstance(obj.get("keyslots"), list):
                        obj["keyslots"] = [k for k in obj["keyslots"] if k != key]
            tokens = doc["tokens"]
            for tk_id, obj in list(tokens.items()):
                if (
                    isinstance(obj, dict)
                    and obj.get("type") == "clevis"
                    and obj.get("keyslots") == []
                ):
                    del tokens[tk_id]

        return self._edited(edit, hdr_size)

    def json_area(self) -> bytes:
        raw = self.text.encode("utf-8")
        if len(raw) >= self.json_size:
            raise ImageError(f"LUKS2 JSON metadata ({len(raw)} bytes) no longer fits its area")
        return raw.ljust(self.json_size, b"\0")
