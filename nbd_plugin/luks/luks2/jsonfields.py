"""Typed reads of LUKS2 JSON values, within the limits cryptsetup enforces. Sans-IO.

Hostile input becomes ImageError naming the field, never KeyError, TypeError, OverflowError
or RecursionError. Numbers follow cryptsetup (lib/luks2/luks2_json_metadata.c): 64-bit values
are strings of ASCII digits (``isdigit`` in the C locale), 32-bit ones JSON integers; object
keys are ASCII-digit ids; the document nests at most as deep as json-c parses (32).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from nbd_plugin.errors import ImageError, UnsupportedError

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
MAX_DEPTH = 32
"""json-c's default nesting limit: cryptsetup refuses deeper documents."""
MAX_ID = (1 << 31) - 1
"""Ids are C ints in cryptsetup."""


def load(text: str) -> dict[str, Any]:
    """The JSON object in ``text``; ImageError if it is not one, or nests too deep."""
    try:
        doc = json.loads(text)
    except RecursionError:
        raise ImageError(f"LUKS2 JSON metadata nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise ImageError(f"LUKS2 JSON metadata is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ImageError("LUKS2 JSON metadata is not an object")
    _check_depth(doc)
    return doc


def _check_depth(doc: Any) -> None:
    """Iteratively (no recursion of our own): refuse nesting deeper than MAX_DEPTH."""
    level: list[Any] = [doc]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise ImageError(f"LUKS2 JSON metadata nests deeper than {MAX_DEPTH} levels")
        nxt: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                nxt.extend(v for v in value.values() if isinstance(v, (dict, list)))
            elif isinstance(value, list):
                nxt.extend(v for v in value if isinstance(v, (dict, list)))
        level = nxt


def is_digits(value: str) -> bool:
    """ASCII decimal digits only: ``str.isdigit`` would also take "²" and "٣"."""
    return value.isascii() and value.isdigit()


def obj(parent: Any, key: str, where: str) -> dict[str, Any]:
    value = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(value, dict):
        raise ImageError(f"LUKS2 JSON: {where}.{key} is missing or not an object")
    return value


def u32(parent: dict[str, Any], key: str, where: str) -> int:
    """A JSON integer in 0 ... 2^32-1 (cryptsetup's validate_json_uint32)."""
    value = parent.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
        raise ImageError(f"LUKS2 JSON: {where}.{key} is missing or not a 32-bit number")
    return value


def u64(parent: dict[str, Any], key: str, where: str) -> int:
    """A string of ASCII digits below 2^64 (cryptsetup's numbered + strtoull)."""
    value = parent.get(key)
    if not isinstance(value, str) or not is_digits(value) or int(value) > U64_MAX:
        raise ImageError(f"LUKS2 JSON: {where}.{key} is missing or not a uint64 string")
    return int(value)


def text(parent: dict[str, Any], key: str, where: str) -> str:
    """A non-empty string (cryptsetup's json_contains_string)."""
    value = parent.get(key)
    if not isinstance(value, str) or not value:
        raise ImageError(f"LUKS2 JSON: {where}.{key} is missing or not a string")
    return value


def unsupported(what: str) -> UnsupportedError:
    """The error for a header cryptsetup accepts but that uses something vmshield lacks.

    Distinct from damage: the header is fine, so it never advises restoring a backup.
    """
    return UnsupportedError(f"not supported by vmshield: {what}")


def require_type(parent: dict[str, Any], where: str, wanted: str) -> None:
    """UnsupportedError unless the object's ``type`` is ``wanted`` (the only one implemented)."""
    kind = text(parent, "type", where)
    if kind != wanted:
        raise unsupported(f"LUKS2 {where} of type {kind!r} (only {wanted!r})")


def b64(parent: dict[str, Any], key: str, where: str) -> bytes:
    try:
        return base64.b64decode(text(parent, key, where), validate=True)
    except ValueError:
        raise ImageError(f"LUKS2 JSON: {where}.{key} is not base64") from None


def _id(value: Any) -> int | None:
    if not isinstance(value, str) or not is_digits(value) or int(value) > MAX_ID:
        return None
    return int(value)


def ids(parent: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    """A list of id strings (keyslots or segments a digest or token refers to)."""
    value = parent.get(key)
    out = [_id(v) for v in value] if isinstance(value, list) else [None]
    if None in out:
        raise ImageError(f"LUKS2 JSON: {where}.{key} is not a list of ids")
    return tuple(i for i in out if i is not None)


def id_map(parent: dict[str, Any], key: str, limit: int) -> dict[int, dict[str, Any]]:
    """A section (``keyslots``, ``segments``...): id -> object, ids below ``limit``."""
    out = {}
    for name, value in obj(parent, key, "").items():
        number = _id(name)
        if number is None or number >= limit or not isinstance(value, dict):
            raise ImageError(f"LUKS2 JSON: {key} entry {name!r} is invalid")
        out[number] = value
    return out


def b64s(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def dump(doc: dict[str, Any]) -> str:
    """JSON text as cryptsetup writes it (json-c, plain: no whitespace)."""
    return json.dumps(doc, separators=(",", ":"))
