"""Clevis tokens in LUKS2 metadata: read them, add one, and what a JWE's pins are. Sans-IO.

`clevis luks bind` stores a keyslot's passphrase encrypted to a Tang server, a TPM2 or a
Shamir (sss) combination of them as a token of type ``clevis``::

    "tokens": {"0": {"type": "clevis", "keyslots": ["1"],
                     "jwe": {"protected": "...", "encrypted_key": "", "iv": "...",
                             "ciphertext": "...", "tag": "..."}}}

The ``jwe`` is the flattened JSON serialization (RFC 7516, section 7.2.2) of what
``clevis encrypt`` prints in the compact one (section 7.1); ``clevis decrypt`` reads the
compact one. Everything here is pure: the metadata text in, tokens or new metadata out.
Hostile input becomes ImageError naming the token, never KeyError or TypeError.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from nbd_plugin.errors import ImageError
from nbd_plugin.luks.luks2 import jsonfields as jf
from nbd_plugin.luks.luks2.metadata import MAX_OBJECTS, Metadata

TOKEN_TYPE = "clevis"
#: the members of a flattened JWE with one recipient, in compact order (RFC 7516, 7.1)
COMPACT_PARTS = ("protected", "encrypted_key", "iv", "ciphertext", "tag")
MAX_JWE = 64 * 1024  # a tang+tpm2 sss JWE is a few KiB; the JSON area is at most 4 MiB
_B64URL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _is_b64url(text: str) -> bool:
    return text.isascii() and set(text.encode()) <= _B64URL


def split_compact(compact: bytes) -> dict[str, str]:
    """A compact JWE (``clevis encrypt``'s output) as the flattened JSON object clevis stores."""
    try:
        text = compact.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ImageError("clevis JWE is not ASCII: not a compact JWE") from None
    parts = text.split(".")
    if len(parts) != len(COMPACT_PARTS) or not all(_is_b64url(p) for p in parts):
        raise ImageError("clevis JWE is not a compact JWE (five base64url parts)")
    return dict(zip(COMPACT_PARTS, parts, strict=True))


def pins_of(header: dict[str, Any], depth: int = 0) -> list[str]:
    """What a clevis JWE is bound to, from its protected header: ``tang http://...``, ``tpm2``,
    ``sss 1 of [...]``. Untrusted data: only for messages, never for decisions."""
    clevis = header.get("clevis")
    if not isinstance(clevis, dict) or depth > 4:
        return ["unknown pin"]
    pin = clevis.get("pin")
    config = clevis.get(pin) if isinstance(pin, str) else None
    if pin == "tang" and isinstance(config, dict):
        return [f"tang {config.get('url')}"]
    if pin == "sss" and isinstance(config, dict) and isinstance(config.get("jwe"), list):
        inner: list[str] = []
        for item in config["jwe"][:16]:
            try:
                inner += pins_of(protected_header(str(item).split(".")[0]), depth + 1)
            except ImageError:
                inner.append("unknown pin")
        return [f"sss {config.get('t')} of [{', '.join(inner)}]"]
    return [str(pin) if isinstance(pin, str) else "unknown pin"]


def protected_header(b64: str) -> dict[str, Any]:
    try:
        header = json.loads(_b64url_decode(b64))
    except (binascii.Error, ValueError, RecursionError):
        raise ImageError("clevis JWE: protected header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise ImageError("clevis JWE: protected header is not a JSON object")
    return header


@dataclass(frozen=True)
class ClevisToken:
    """A clevis token: the keyslots it opens and the JWE holding their passphrase."""

    id: int
    keyslots: tuple[int, ...]
    jwe: dict[str, str]

    def compact(self) -> bytes:
        """The JWE in the compact serialization, what ``clevis decrypt`` reads on stdin."""
        return ".".join(self.jwe[p] for p in COMPACT_PARTS).encode("ascii")

    def pins(self) -> str:
        """``tang http://tang.example``, ``sss 1 of [tang ..., tpm2]``: for messages."""
        return ", ".join(pins_of(protected_header(self.jwe["protected"])))


def _token(tk_id: int, obj: dict[str, Any]) -> ClevisToken:
    where = f"tokens.{tk_id}"
    jwe = obj.get("jwe")
    if not isinstance(jwe, dict):
        raise ImageError(f"LUKS2 JSON: {where}.jwe is not a JWE object: header corrupt")
    extra = set(jwe) - set(COMPACT_PARTS)
    if extra:
        raise ImageError(
            f"LUKS2 JSON: {where}.jwe has members {sorted(extra)} a clevis JWE does not have"
        )
    parts = {p: jwe.get(p, "") for p in COMPACT_PARTS}
    if not all(isinstance(v, str) and _is_b64url(v) for v in parts.values()):
        raise ImageError(f"LUKS2 JSON: {where}.jwe members must be base64url strings")
    if sum(len(v) for v in parts.values()) > MAX_JWE:
        raise ImageError(f"LUKS2 JSON: {where}.jwe is larger than {MAX_JWE} bytes")
    token = ClevisToken(tk_id, jf.ids(obj, "keyslots", where), parts)
    token.pins()  # the protected header must at least be JSON
    return token


def clevis_tokens(meta: Metadata) -> list[ClevisToken]:
    """The clevis tokens of the metadata, by token id (other token types are ignored)."""
    tokens = jf.id_map(jf.load(meta.text), "tokens", MAX_OBJECTS)
    return [_token(k, v) for k, v in sorted(tokens.items()) if v.get("type") == TOKEN_TYPE]


def token_object(keyslot: int, jwe: dict[str, str]) -> dict[str, Any]:
    """The token `clevis luks bind` writes for ``keyslot`` (``cryptsetup token import``)."""
    return {"type": TOKEN_TYPE, "keyslots": [str(keyslot)], "jwe": dict(jwe)}


def free_token_id(meta: Metadata) -> int:
    used = jf.id_map(jf.load(meta.text), "tokens", MAX_OBJECTS)
    for i in range(MAX_OBJECTS):
        if i not in used:
            return i
    raise ImageError(f"all {MAX_OBJECTS} LUKS2 tokens are in use")


def with_jwe(meta: Metadata, token_id: int, jwe: dict[str, str], hdr_size: int) -> Metadata:
    """A copy of ``meta`` whose clevis token ``token_id`` holds ``jwe`` (`clevis luks regen`)."""
    doc = jf.load(meta.text)
    token = doc.get("tokens", {}).get(str(token_id))
    if not isinstance(token, dict) or token.get("type") != TOKEN_TYPE:
        raise ImageError(f"token {token_id} is not a clevis token")
    token["jwe"] = dict(jwe)
    return Metadata.parse(jf.dump(doc), hdr_size)


def with_token(meta: Metadata, token: dict[str, Any], hdr_size: int) -> Metadata:
    """A copy of ``meta`` with ``token`` added under the lowest free token id."""
    doc = jf.load(meta.text)
    doc.setdefault("tokens", {})[str(free_token_id(meta))] = token
    return Metadata.parse(jf.dump(doc), hdr_size)
