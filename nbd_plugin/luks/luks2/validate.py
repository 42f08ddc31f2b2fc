"""cryptsetup's LUKS2 header rules, rule by rule, on the JSON area and its document. Sans-IO.

A header copy cryptsetup (2.6) refuses is a damaged copy here too: the reader then uses the
other copy, as cryptsetup does, or refuses the image. Each function below mirrors one
validator of cryptsetup's ``lib/luks2`` (named in its docstring) and raises ImageError with one
line saying which rule failed. Nothing here decides what vmshield *implements*: a header that
passes these rules but uses a feature vmshield lacks (a reencryption, a segment type other
than ``crypt``) is refused later, by ``metadata``, as "not supported by vmshield".

The order is cryptsetup's ``LUKS2_hdr_validate``: requirements, tokens, digests, segments,
keyslots, config, keyslot areas, the JSON size, then the keyslot implementations. As in
cryptsetup, each check relies on the ones before it (``header`` runs them all): call them
in that order only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from nbd_plugin.errors import ImageError
from nbd_plugin.luks.luks2 import jsonfields as jf

METADATA_SIZES = tuple(1 << n for n in range(14, 23))
"""Binary header + JSON area sizes cryptsetup allows (LUKS2_check_metadata_area_size)."""
MAX_KEYSLOTS_SIZE = 128 << 20  # LUKS2_MAX_KEYSLOTS_SIZE
JSON_WHITESPACE = b" \t\r\n"
"""What json-c's tokener consumes after the document; anything else there is refused."""
_REENCRYPT_FLAG = re.compile(r"online-reencrypt(-v[0-9]+)?\Z")
"""reencrypt_candidate_flag(): what cryptsetup counts as an online-reencrypt requirement."""
_KNOWN_ONLINE = frozenset(("online-reencrypt", "online-reencrypt-v2", "online-reencrypt-v3"))
"""The online-reencrypt requirements cryptsetup 2.6 knows (requirements_flags)."""


def _fail(rule: str) -> ImageError:
    return ImageError(f"LUKS2 header refused (as cryptsetup refuses it): {rule}")


# ---- the JSON area (luks2_disk_metadata.c) --------------------------------------------------
def json_area(area: bytes) -> str:
    """The JSON text of an area (validate_json_area): it starts with ``{``, and every byte
    after the document (past the whitespace json-c's tokener consumes) is NUL, at least one.
    """
    if not area.startswith(b"{"):
        raise _fail("the JSON area does not start with '{'")
    end = area.find(b"\0")
    if end < 0:
        raise _fail("the JSON area is not NUL terminated")
    try:
        text = area[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("the JSON area is not UTF-8") from None
    try:
        _, stop = json.JSONDecoder().raw_decode(text)
    except RecursionError:
        raise ImageError(f"LUKS2 JSON metadata nests deeper than {jf.MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise ImageError(f"LUKS2 JSON metadata is not valid JSON ({exc})") from None
    if text[stop:].strip(JSON_WHITESPACE.decode()):
        raise _fail("bytes other than whitespace follow the JSON document")
    if area[end:].count(0) != len(area) - end:
        raise _fail("bytes after the JSON text's terminating NUL are not all zero")
    return text


# ---- helpers with cryptsetup's semantics ---------------------------------------------------
def _section(doc: dict[str, Any], key: str) -> dict[str, Any]:
    """json_contains(..., json_type_object) on the top level."""
    value = doc.get(key)
    if not isinstance(value, dict):
        raise _fail(f"'{key}' is missing or not an object")
    return value


def _numbered(section: str, key: str) -> None:
    """numbered(): an id is ASCII digits (isdigit in the C locale); here also not empty and
    within a C int, as cryptsetup's atoi() of it needs."""
    if not jf.is_digits(key) or int(key) > jf.MAX_ID:
        raise _fail(f"{section} id {key!r} is not a number")


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    """json_contains_string(): present, a string, not empty."""
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise _fail(f"{where}.{key} is missing or not a non-empty string")
    return value


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    """json_contains(..., json_type_int)."""
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{where}.{key} is missing or not an integer")
    return value


def _uint32(obj: dict[str, Any], key: str, where: str) -> int:
    """json_type_int and validate_json_uint32()."""
    value = _int(obj, key, where)
    if not 0 <= value <= jf.U32_MAX:
        raise _fail(f"{where}.{key} is not a 32-bit unsigned number")
    return value


def _uint64(obj: dict[str, Any], key: str, where: str) -> int:
    """A numbered string that strtoull takes (numbered() + json_str_to_uint64())."""
    value = _string(obj, key, where)
    if not jf.is_digits(value) or int(value) > jf.U64_MAX:
        raise _fail(f"{where}.{key} is not a uint64 string")
    return int(value)


def _strings(obj: dict[str, Any], key: str, where: str, *, optional: bool) -> list[str]:
    """An array whose members are all strings (segment and config flags, requirements)."""
    if key not in obj and optional:
        return []
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(f"{where}.{key} is not an array of strings")
    return value


def _refs(obj: dict[str, Any], key: str, where: str, target: dict[str, Any], kind: str) -> None:
    """validate_keyslots_array / validate_segments_array: strings naming existing objects."""
    value = obj.get(key)
    if not isinstance(value, list):
        raise _fail(f"{where}.{key} is missing or not an array")
    for item in value:
        if not isinstance(item, str) or not isinstance(target.get(item), dict):
            raise _fail(f"{where}.{key} names {item!r}, which is no {kind}")


def _each(section: dict[str, Any], name: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key, value in section.items():
        _numbered(name, key)
        if not isinstance(value, dict):
            raise _fail(f"{name} {key} is not an object")
        out.append((key, value))
    return out


# ---- LUKS2_hdr_validate's checks, in its order ---------------------------------------------
def requirements(doc: dict[str, Any]) -> list[str]:
    """hdr_validate_requirements: config.requirements.mandatory is an array of strings with
    at most one online-reencrypt flag. Returns the mandatory requirements."""
    config = _section(doc, "config")
    if "requirements" not in config:
        return []
    required = config["requirements"]
    if not isinstance(required, dict):
        raise _fail("config.requirements is not an object")
    mandatory = _strings(required, "mandatory", "config.requirements", optional=True)
    if sum(1 for flag in mandatory if _REENCRYPT_FLAG.match(flag)) > 1:
        raise _fail("more than one online-reencrypt requirement")
    return mandatory


def tokens(doc: dict[str, Any]) -> None:
    """hdr_validate_tokens / LUKS2_token_validate: a type, and keyslots that exist."""
    keyslots = _section(doc, "keyslots")
    for key, token in _each(_section(doc, "tokens"), "token"):
        _string(token, "type", f"tokens.{key}")
        _refs(token, "keyslots", f"tokens.{key}", keyslots, "keyslot")


def digests(doc: dict[str, Any]) -> None:
    """hdr_validate_digests: a type; keyslots and segments arrays naming existing objects."""
    keyslots, segments = _section(doc, "keyslots"), _section(doc, "segments")
    for key, digest in _each(_section(doc, "digests"), "digest"):
        where = f"digests.{key}"
        _string(digest, "type", where)
        _refs(digest, "keyslots", where, keyslots, "keyslot")
        _refs(digest, "segments", where, segments, "segment")


def _is_backup(segment: dict[str, Any]) -> bool:
    """json_segment_is_backup: a flag starting with "backup-"."""
    return any(f.startswith("backup-") for f in segment.get("flags", []))


def _crypt_segment(key: str, seg: dict[str, Any], size: int, doc: dict[str, Any]) -> None:
    """hdr_validate_crypt_segment."""
    where = f"segments.{key}"
    iv_tweak = _string(seg, "iv_tweak", where)
    _string(seg, "encryption", where)
    sector = _int(seg, "sector_size", where)
    if "integrity" in seg:
        integrity = seg["integrity"]
        if not isinstance(integrity, dict):
            raise _fail(f"{where}.integrity is not an object")
        for field in ("type", "journal_encryption", "journal_integrity"):
            _string(integrity, field, f"{where}.integrity")
    if not 0 <= sector <= jf.U32_MAX or not sector or sector % 512:
        raise _fail(f"{where}.sector_size {sector} is not a positive multiple of 512")
    if not jf.is_digits(iv_tweak) or int(iv_tweak) > jf.U64_MAX:
        raise _fail(f"{where}.iv_tweak is not a uint64 string")
    if size % sector:
        raise _fail(f"{where}.size is not a multiple of its sector size")
    if not any(key in d.get("segments", []) for d in doc["digests"].values()):
        raise _fail(f"crypt segment {key} is assigned to no digest")


def segments(doc: dict[str, Any]) -> None:
    """hdr_validate_segments: ids, type/offset/size, 512-byte alignment, flags (an array of
    strings), regular segments before backups with no gap in the ids, regular segments not
    overlapping and only the last one "dynamic"; crypt segments checked further."""
    section = _section(doc, "segments")
    if not section:
        raise _fail("the segments section is empty")
    _section(doc, "digests")
    first_backup: int | None = None
    regular: dict[int, tuple[int, int | None]] = {}
    for key, seg in _each(section, "segment"):
        where = f"segments.{key}"
        kind = _string(seg, "type", where)
        offset = _uint64(seg, "offset", where)
        _string(seg, "size", where)
        size = 0 if seg["size"] == "dynamic" else _uint64(seg, "size", where)
        if seg["size"] != "dynamic" and not size:
            raise _fail(f"{where}.size is zero")
        if offset % 512 or size % 512:
            raise _fail(f"{where}: offset and size must be multiples of 512")
        _strings(seg, "flags", where, optional=True)
        number = int(key)
        if _is_backup(seg):
            first_backup = number if first_backup is None else min(first_backup, number)
        else:
            regular[number] = (offset, size or None)
        if kind == "crypt":
            _crypt_segment(key, seg, size, doc)
    for number in regular:
        if first_backup is not None and number >= first_backup:
            raise _fail(f"regular segment {number} follows backup segment {first_backup}")
    if first_backup == 0:
        raise _fail("no regular segment")
    count = first_backup if first_backup is not None else len(section)
    if sorted(regular) != list(range(count)) or set(map(int, section)) != set(range(len(section))):
        raise _fail("the segment ids have a gap")
    _segment_intervals([regular[i] for i in range(count)])
    _reencrypt_backups(doc, section)


def _reencrypt_backups(doc: dict[str, Any], section: dict[str, Any]) -> None:
    """validate_reencrypt_segments, in part: an online reencryption keeps both backup segments
    (cryptsetup also compares each regular segment with them; a reencryption is refused later
    as not supported by vmshield anyway)."""
    if not _online(doc):
        return
    flags = {f for seg in section.values() for f in seg.get("flags", [])}
    if not {"backup-final", "backup-previous"} <= flags:
        raise _fail("an online reencryption without its backup segments")


def _online(doc: dict[str, Any]) -> bool:
    """Whether a known online-reencrypt requirement is set (CRYPT_REQUIREMENT_ONLINE_REENCRYPT)."""
    required = doc["config"].get("requirements", {})
    return bool(_KNOWN_ONLINE & set(required.get("mandatory", [])))


def _segment_intervals(intervals: list[tuple[int, int | None]]) -> None:
    """validate_segment_intervals: no overlap; only the last segment may be "dynamic"."""
    for i, (offset, size) in enumerate(intervals):
        if size is None and i != len(intervals) - 1:
            raise _fail(f"segment {i} is 'dynamic' but not the last one")
        for j, (other, other_size) in enumerate(intervals):
            if i == j:
                continue
            if other_size is not None and other + other_size > jf.U64_MAX:
                raise _fail(f"segment {j}: offset + size overflows")
            if offset >= other and (other_size is None or offset < other + other_size):
                raise _fail(f"segments {i} and {j} overlap")


def keyslots(doc: dict[str, Any]) -> None:
    """hdr_validate_keyslots / LUKS2_keyslot_validate: a type and a uint32 key_size."""
    for key, ks in _each(_section(doc, "keyslots"), "keyslot"):
        _string(ks, "type", f"keyslots.{key}")
        _uint32(ks, "key_size", f"keyslots.{key}")


def config(doc: dict[str, Any]) -> tuple[int, int]:
    """hdr_validate_config: json_size and keyslots_size (4 KiB aligned, at most 128 MiB),
    the keyslots area ending before the first data segment, flags an array of strings.
    Returns (metadata size, keyslots size)."""
    cfg = _section(doc, "config")
    metadata = _uint64(cfg, "json_size", "config") + 4096
    keyslots_size = _uint64(cfg, "keyslots_size", "config")
    if metadata not in METADATA_SIZES:
        raise _fail(f"config.json_size gives a header of {metadata} bytes, not a LUKS2 size")
    if keyslots_size % 4096 or keyslots_size > MAX_KEYSLOTS_SIZE:
        raise _fail(f"config.keyslots_size {keyslots_size} is invalid")
    offsets = [int(seg["offset"]) for seg in doc["segments"].values() if not _is_backup(seg)]
    first = 0 if 0 in offsets else min(offsets, default=0)
    if first and (first < keyslots_size or first - keyslots_size < 2 * metadata):
        raise _fail(f"the keyslots area overlaps the data at offset {first}")
    _strings(cfg, "flags", "config", optional=True)
    return metadata, keyslots_size


def areas(doc: dict[str, Any], metadata: int, keyslots_size: int) -> None:
    """hdr_validate_areas / validate_intervals: every keyslot area lies in the keyslots area,
    is not empty and overlaps no other."""
    intervals = []
    for key, ks in doc["keyslots"].items():
        where = f"keyslots.{key}.area"
        area = ks.get("area")
        if not isinstance(area, dict):
            raise _fail(f"{where} is missing or not an object")
        _string(area, "type", where)
        intervals.append((_uint64(area, "offset", where), _uint64(area, "size", where), key))
    end = 2 * metadata + keyslots_size
    for offset, length, key in intervals:
        if offset < 2 * metadata or not length or offset + length > end:
            raise _fail(f"keyslot {key}'s area is empty or outside the keyslots area")
        for other, other_length, other_key in intervals:
            if other_key != key and other <= offset < other + other_length:
                raise _fail(f"keyslots {key} and {other_key}: areas overlap")


def json_size(doc: dict[str, Any], area_size: int) -> None:
    """hdr_validate_json_size: config.json_size is the binary header's JSON area size."""
    if int(doc["config"]["json_size"]) != area_size:
        raise _fail("config.json_size disagrees with the binary header's size")


_KDF_FIELDS: dict[str, tuple[tuple[str, Callable[..., Any]], ...]] = {
    "pbkdf2": (("hash", _string), ("iterations", _int), ("salt", _string)),
    "argon2i": (("time", _int), ("memory", _int), ("cpus", _int), ("salt", _string)),
    "argon2id": (("time", _int), ("memory", _int), ("cpus", _int), ("salt", _string)),
}


def _luks2_keyslot(key: str, ks: dict[str, Any]) -> None:
    """luks2_keyslot_validate: kdf, af (type luks1) and area (type raw) with their fields."""
    where = f"keyslots.{key}"
    parts = {}
    for part in ("kdf", "af", "area"):
        value = ks.get(part)
        if not isinstance(value, dict):
            raise _fail(f"{where}.{part} is missing or not an object")
        parts[part] = value
    kdf_type = _string(parts["kdf"], "type", f"{where}.kdf")
    for field, check in _KDF_FIELDS.get(kdf_type, ()):
        check(parts["kdf"], field, f"{where}.kdf")
    if _string(parts["af"], "type", f"{where}.af") != "luks1":
        raise _fail(f"{where}.af.type is not 'luks1'")
    _string(parts["af"], "hash", f"{where}.af")
    _int(parts["af"], "stripes", f"{where}.af")
    if _string(parts["area"], "type", f"{where}.area") != "raw":
        raise _fail(f"{where}.area.type is not 'raw'")
    _string(parts["area"], "encryption", f"{where}.area")
    _int(parts["area"], "key_size", f"{where}.area")


def _reencrypt_keyslot(key: str, ks: dict[str, Any]) -> None:
    """reenc_keyslot_validate: key_size 1, a mode and a direction cryptsetup knows."""
    where = f"keyslots.{key}"
    if _uint32(ks, "key_size", where) != 1:
        raise _fail(f"{where}: a reencrypt keyslot's key_size must be 1")
    if _string(ks, "mode", where) not in ("reencrypt", "encrypt", "decrypt"):
        raise _fail(f"{where}.mode is not reencrypt, encrypt or decrypt")
    if _string(ks, "direction", where) not in ("forward", "backward"):
        raise _fail(f"{where}.direction is not forward or backward")


def keyslot_implementations(doc: dict[str, Any], mandatory: list[str]) -> None:
    """LUKS2_keyslots_validate: each luks2 keyslot valid and in exactly one digest; at most
    one reencrypt keyslot, present exactly when an online-reencrypt requirement is."""
    reencrypt = 0
    for key, ks in doc["keyslots"].items():
        if ks["type"] == "luks2":
            _luks2_keyslot(key, ks)
            owners = sum(1 for d in doc["digests"].values() if key in d["keyslots"])
            if owners != 1:
                raise _fail(f"keyslot {key} is assigned to {owners} digests, not exactly one")
        elif ks["type"] == "reencrypt":
            _reencrypt_keyslot(key, ks)
            reencrypt += 1
    candidate = any(_REENCRYPT_FLAG.match(flag) for flag in mandatory)
    if reencrypt > 1:
        raise _fail("more than one reencrypt keyslot")
    if reencrypt and not candidate:
        raise _fail("a reencrypt keyslot without an online-reencrypt requirement")
    if not reencrypt and _KNOWN_ONLINE & set(mandatory):
        raise _fail("an online-reencrypt requirement without its reencrypt keyslot")


def header(doc: dict[str, Any], area_size: int) -> None:
    """LUKS2_hdr_validate: every rule above, in cryptsetup's order."""
    mandatory = requirements(doc)
    tokens(doc)
    digests(doc)
    segments(doc)
    keyslots(doc)
    metadata, keyslots_size = config(doc)
    areas(doc, metadata, keyslots_size)
    json_size(doc, area_size)
    keyslot_implementations(doc, mandatory)
