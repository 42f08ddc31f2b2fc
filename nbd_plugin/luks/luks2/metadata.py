"""LUKS2 JSON metadata as frozen dataclasses over the verbatim document. Sans-IO.

The JSON object has ``keyslots``, ``tokens``, ``segments``, ``digests`` and ``config``
(LUKS2 on-disk format document, section 3); 64-bit numbers are strings. ``Metadata`` keeps
the document as text and re-serialises it only where a keyslot is added or removed, so
tokens and fields this module does not know survive untouched. Hostile input becomes
ImageError naming the field, never KeyError or TypeError.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbd_plugin.crypto import argon2 as argon
from nbd_plugin.crypto.pbkdf2 import check_hash, pbkdf2
from nbd_plugin.crypto.registry import check_supported, make_cipher
from nbd_plugin.errors import ImageError, UnsupportedError
from nbd_plugin.luks import af

BIN_SIZE = 4096  # the binary header before each JSON area
KEYSLOT_SECTOR = 512  # keyslot areas are always encrypted in 512-byte sectors from IV 0
SECTOR_SIZES = (512, 1024, 2048, 4096)


# ---- JSON helpers: hostile input becomes ImageError naming the field ---------------------
def _obj(parent: Any, key: str, where: str) -> dict[str, Any]:
    value = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(value, dict):
        raise ImageError(f"LUKS2 JSON: {where}.{key} is missing or not an object")
    return value


def _int(parent: dict[str, Any], key: str, where: str) -> int:
    value = parent.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImageError(f"LUKS2 JSON: {where}.{key} is missing or not a number")
    return value


def _u64(parent: dict[str, Any], key: str, where: str) -> int:
    value = parent.get(key)
    if not isinstance(value, str) or not value.isdigit() or int(value) >= 1 << 64:
        raise ImageError(f"LUKS2 JSON: {where}.{key} is missing or not a uint64 string")
    return int(value)


def _str(parent: dict[str, Any], key: str, where: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str):
        raise ImageError(f"LUKS2 JSON: {where}.{key} is missing or not a string")
    return value


def _b64(parent: dict[str, Any], key: str, where: str) -> bytes:
    try:
        return base64.b64decode(_str(parent, key, where), validate=True)
    except ValueError:
        raise ImageError(f"LUKS2 JSON: {where}.{key} is not base64") from None


def _ids(parent: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = parent.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.isdigit() for v in value):
        raise ImageError(f"LUKS2 JSON: {where}.{key} is not a list of ids")
    return tuple(int(v) for v in value)


def _b64s(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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
        kind = _str(obj, "type", where)
        salt = _b64(obj, "salt", where)
        if kind == "pbkdf2":
            return cls(
                kind, salt, hash=_str(obj, "hash", where), iterations=_int(obj, "iterations", where)
            )
        if kind in argon.TYPES:
            return cls(
                kind,
                salt,
                time=_int(obj, "time", where),
                memory=_int(obj, "memory", where),
                cpus=_int(obj, "cpus", where),
            )
        return cls(kind, salt)  # unknown: kept, refused by check()

    def to_json(self) -> dict[str, Any]:
        if self.type == "pbkdf2":
            return {
                "type": "pbkdf2",
                "hash": self.hash,
                "iterations": self.iterations,
                "salt": _b64s(self.salt),
            }
        return {
            "type": self.type,
            "time": self.time,
            "memory": self.memory,
            "cpus": self.cpus,
            "salt": _b64s(self.salt),
        }

    def check(self) -> None:
        """UnsupportedError / ImageError before any expensive work."""
        if self.type == "pbkdf2":
            check_hash(self.hash)
            if self.iterations < 1:
                raise ImageError("pbkdf2 with 0 iterations: header corrupt")
            return
        try:
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
        kind = _str(obj, "type", where)
        area = _obj(obj, "area", where)
        if kind != "luks2":  # e.g. "reencrypt": keep its area, never try to open it
            return cls(
                ks_id,
                kind,
                0,
                0,
                "",
                _u64(area, "offset", where),
                _u64(area, "size", where),
                "",
                0,
                Kdf("none", b""),
                0,
            )
        afo = _obj(obj, "af", where)
        if _str(afo, "type", f"{where}.af") != "luks1":
            raise UnsupportedError(f"keyslot {ks_id}: AF type {afo.get('type')!r} not supported")
        if _str(area, "type", f"{where}.area") != "raw":
            raise UnsupportedError(f"keyslot {ks_id}: area type {area.get('type')!r} unsupported")
        priority = obj.get("priority", 1)
        return cls(
            ks_id,
            kind,
            _int(obj, "key_size", where),
            _int(afo, "stripes", f"{where}.af"),
            _str(afo, "hash", f"{where}.af"),
            _u64(area, "offset", f"{where}.area"),
            _u64(area, "size", f"{where}.area"),
            _str(area, "encryption", f"{where}.area"),
            _int(area, "key_size", f"{where}.area"),
            Kdf.from_json(_obj(obj, "kdf", where), f"{where}.kdf"),
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
        kind = _str(obj, "type", where)
        if kind != "crypt":
            raise UnsupportedError(f"LUKS2 segment type {kind!r} is not supported")
        if "integrity" in obj:
            raise UnsupportedError("LUKS2 with authenticated encryption (integrity) unsupported")
        size = None if obj.get("size") == "dynamic" else _u64(obj, "size", where)
        sector = _int(obj, "sector_size", where)
        if sector not in SECTOR_SIZES:
            raise ImageError(f"LUKS2 segment sector size {sector} is invalid")
        return cls(
            seg_id,
            _u64(obj, "offset", where),
            size,
            _u64(obj, "iv_tweak", where),
            _str(obj, "encryption", where),
            sector,
        )

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
        kind = _str(obj, "type", where)
        if kind != "pbkdf2":
            raise UnsupportedError(f"LUKS2 digest type {kind!r} is not supported")
        return cls(
            dg_id,
            _ids(obj, "keyslots", where),
            _ids(obj, "segments", where),
            _str(obj, "hash", where),
            _int(obj, "iterations", where),
            _b64(obj, "salt", where),
            _b64(obj, "digest", where),
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
            "salt": _b64s(self.salt),
            "digest": _b64s(self.digest),
        }

    def matches(self, key: bytes | bytearray) -> bool:
        check_hash(self.hash)
        value = pbkdf2(self.hash, bytes(key), self.salt, self.iterations, len(self.digest))
        return hmac.compare_digest(value, self.digest)


def _id_map(obj: dict[str, Any], where: str) -> dict[int, dict[str, Any]]:
    out = {}
    for key, value in obj.items():
        if not key.isdigit() or not isinstance(value, dict):
            raise ImageError(f"LUKS2 JSON: {where} entry {key!r} is invalid")
        out[int(key)] = value
    return out


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
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ImageError(f"LUKS2 JSON metadata is not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ImageError("LUKS2 JSON metadata is not an object")
        config = _obj(doc, "config", "")
        json_size = _u64(config, "json_size", "config")
        if json_size != hdr_size - BIN_SIZE:
            raise ImageError(f"LUKS2 config.json_size {json_size} disagrees with hdr_size")
        _obj(doc, "tokens", "")
        required = config.get("requirements", {})
        mandatory = required.get("mandatory", []) if isinstance(required, dict) else []
        segments = _id_map(_obj(doc, "segments", ""), "segments")
        if len(segments) != 1:
            raise UnsupportedError(
                f"LUKS2 with {len(segments)} data segments (an interrupted reencryption?) "
                "is not supported; finish it with cryptsetup first"
            )
        ((seg_id, seg_obj),) = segments.items()
        return cls(
            text,
            json_size,
            _u64(config, "keyslots_size", "config"),
            tuple(
                Keyslot.from_json(k, v)
                for k, v in sorted(_id_map(_obj(doc, "keyslots", ""), "keyslots").items())
            ),
            Segment.from_json(seg_id, seg_obj),
            tuple(
                Digest.from_json(k, v)
                for k, v in sorted(_id_map(_obj(doc, "digests", ""), "digests").items())
            ),
            tuple(str(m) for m in mandatory) if isinstance(mandatory, list) else ("?",),
        )

    def validate(self, hdr_size: int) -> None:
        """Structural checks that need no passphrase."""
        if self.requirements:
            raise UnsupportedError(
                f"LUKS2 requirements {', '.join(self.requirements)} are not supported"
            )
        start, end = 2 * hdr_size, 2 * hdr_size + self.keyslots_size
        if self.segment.offset == 0:
            raise UnsupportedError("LUKS2 with a detached header (data offset 0) unsupported")
        if self.segment.offset < end or self.segment.offset % self.segment.sector_size:
            raise ImageError(
                f"LUKS2 data offset {self.segment.offset} overlaps the keyslots area "
                "or is not sector aligned: header corrupt"
            )
        for ks in self.keyslots:
            if ks.area_offset < start or ks.area_offset + ks.area_size > end:
                raise ImageError(f"keyslot {ks.id}: area lies outside the keyslots area")
        if split_spec(self.segment.encryption)[0] == "cipher_null":
            raise UnsupportedError("LUKS2 with cipher_null (no encryption) is not supported")
        if not self.digest_for_segment():
            raise ImageError("LUKS2: no digest covers the data segment: header corrupt")

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
        doc = copy.deepcopy(json.loads(self.text))
        edit(doc)
        return Metadata.parse(dump(doc), hdr_size)

    def with_keyslot(self, ks: Keyslot, digest_id: int, hdr_size: int) -> Metadata:
        """A copy with ``ks`` added and bound to digest ``digest_id``."""

        def edit(doc: dict[str, Any]) -> None:
            doc["keyslots"][str(ks.id)] = ks.to_json()
            doc["digests"][str(digest_id)]["keyslots"].append(str(ks.id))

        return self._edited(edit, hdr_size)

    def without_keyslot(self, ks_id: int, hdr_size: int) -> Metadata:
        """A copy without keyslot ``ks_id``; digests and tokens stop referring to it."""
        key = str(ks_id)

        def edit(doc: dict[str, Any]) -> None:
            del doc["keyslots"][key]
            for section in ("digests", "tokens"):
                for obj in doc[section].values():
                    if isinstance(obj, dict) and isinstance(obj.get("keyslots"), list):
                        obj["keyslots"] = [k for k in obj["keyslots"] if k != key]

        return self._edited(edit, hdr_size)

    def json_area(self) -> bytes:
        raw = self.text.encode("utf-8")
        if len(raw) >= self.json_size:
            raise ImageError(f"LUKS2 JSON metadata ({len(raw)} bytes) no longer fits its area")
        return raw.ljust(self.json_size, b"\0")


def dump(doc: dict[str, Any]) -> str:
    """JSON text as cryptsetup writes it (json-c, plain: no whitespace)."""
    return json.dumps(doc, separators=(",", ":"))
