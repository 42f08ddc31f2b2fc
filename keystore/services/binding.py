"""Bind a disk's keyslot to a Tang server (clevis), and unbind it: `vmshield disk bind|unbind`.

`bind` does what `clevis luks bind` does, on a vmshield image in userspace: a random
passphrase, a new keyslot for it (PBKDF2 1000 iterations, as clevis: the passphrase is
random), the passphrase encrypted by `clevis encrypt tang` and stored as a clevis token
linked to that keyslot, in the same header write. `clevis luks list|pass` read what it
writes; `keystore.services.opening` opens the disk with it. The owner's password authorises
the new keyslot (it unlocks the volume key the new keyslot wraps); no secret is kept.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from keystore.errors import KeystoreError, image_error
from keystore.services import clevis


class BindError(KeystoreError):
    """The disk could not be bound or unbound; the message says why (never a secret)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of an EC or RSA public JWK (what tang names its keys by)."""
    members = ("crv", "kty", "x", "y") if jwk.get("kty") == "EC" else ("e", "kty", "n")
    canon = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canon.encode()).digest())


def signing_thumbprints(jwe_compact: bytes, depth: int = 0) -> list[str]:
    """Thumbprints of the Tang signing keys a clevis JWE was made with, sss pins included
    (to show the admin what was trusted)."""
    from nbd_plugin.luks.luks2.tokens import protected_header

    header = protected_header(jwe_compact.split(b".")[0].decode("ascii"))
    clevis_hdr = header.get("clevis", {})
    if clevis_hdr.get("pin") == "sss" and depth < 4:
        inner = clevis_hdr.get("sss", {}).get("jwe", [])
        return [t for jwe in inner for t in signing_thumbprints(str(jwe).encode(), depth + 1)]
    keys = clevis_hdr.get("tang", {}).get("adv", {}).get("keys", [])
    return [jwk_thumbprint(k) for k in keys if "verify" in k.get("key_ops", [])]


@dataclass(frozen=True)
class Bound:
    keyslot: int
    pins: str
    thumbprints: tuple[str, ...]


def tang_config(url: str, thumbprint: str | None) -> dict[str, Any]:
    if not url.startswith(("http://", "https://")):
        raise BindError(f"--url {url!r}: a Tang URL starts with http:// or https://")
    config: dict[str, Any] = {"url": url}
    if thumbprint:
        config["thp"] = thumbprint
    return config


def pin_config(
    pin: str,
    urls: tuple[str, ...],
    *,
    thumbprint: str | None = None,
    pcr_ids: str | None = None,
    threshold: int | None = None,
    tpm2: bool = False,
) -> dict[str, Any]:
    """The `clevis encrypt PIN CONFIG` config of a `vmshield disk bind` command line."""
    # sha256: every TPM 2.0 has that bank (clevis' default sha1 may be disabled or empty)
    tpm_config: dict[str, Any] = {"pcr_bank": "sha256", "pcr_ids": pcr_ids} if pcr_ids else {}
    if pin == "tang":
        if len(urls) != 1 or threshold is not None or tpm2:
            raise BindError("tang takes one --url (and --thumbprint); use sss for several")
        return tang_config(urls[0], thumbprint)
    if pin == "tpm2":
        if urls or thumbprint or threshold is not None or tpm2:
            raise BindError("tpm2 takes only --pcr-ids; use sss to combine it with Tang")
        return tpm_config
    if pin != "sss":
        raise BindError(f"unknown pin {pin!r}: use tang, tpm2 or sss")
    if thumbprint:
        raise BindError("sss: --thumbprint is for a single tang binding")
    pins: dict[str, Any] = {}
    if urls:
        pins["tang"] = [tang_config(u, None) for u in urls]
    if tpm2:
        pins["tpm2"] = tpm_config
    count = len(urls) + int(tpm2)
    if threshold is None or not 1 <= threshold <= count:
        raise BindError(
            f"sss: --threshold must be between 1 and the number of pins ({count}: each --url, "
            "and --tpm2)"
        )
    return {"t": threshold, "pins": pins}


def bind(path: str, owner_password: bytes, pin: str, config: dict[str, Any]) -> Bound:
    """Add a keyslot for a random passphrase and its clevis token for ``pin``/``config``."""
    from nbd_plugin import luks
    from nbd_plugin.errors import VmshieldError
    from nbd_plugin.luks.luks2.tokens import ClevisToken, split_compact

    secret = clevis.new_passphrase()
    try:
        compact = clevis.encrypt(
            pin, config, bytes(secret), trust=pin != "tpm2" and "thp" not in config
        )
        try:
            jwe = split_compact(compact)
            slot = luks.add_clevis_key(
                path,
                owner_password,
                bytes(secret),
                jwe,
                iterations=clevis.BOUND_KEYSLOT_ITERATIONS,
            )
        except (VmshieldError, OSError, ValueError) as e:
            raise image_error(BindError, e, path, "password") from e
    finally:
        secret[:] = bytes(len(secret))
    pins = ClevisToken(-1, (slot,), jwe).pins()
    thps = tuple(signing_thumbprints(compact))
    return Bound(slot, pins, thps)


def unbind(path: str, owner_password: bytes, slot: int) -> str:
    """Remove clevis-bound keyslot ``slot`` and its token; the pins it was bound to."""
    from nbd_plugin import luks
    from nbd_plugin.errors import VmshieldError

    try:
        bound = [t for t in luks.clevis_tokens(path) if slot in t.keyslots]
        if not bound:
            raise BindError(f"keyslot {slot} of {path} is not bound by a clevis token")
        pins = bound[0].pins()
        luks.kill_slot(path, owner_password, slot)
    except (VmshieldError, OSError, ValueError) as e:
        if isinstance(e, BindError):
            raise
        raise image_error(BindError, e, path, "password") from e
    return pins


def rebind(path: str, slot: int, thumbprint: str | None) -> Bound:
    """Re-encrypt the passphrase of tang-bound keyslot ``slot`` to the server's current keys
    (after `tangd-rotate-keys`), as `clevis luks regen`: the old binding must still decrypt
    (the server keeps rotated keys until they are deleted); the keyslot does not change."""
    from nbd_plugin import luks
    from nbd_plugin.errors import VmshieldError
    from nbd_plugin.luks.luks2.tokens import protected_header, split_compact

    try:
        bound = [t for t in luks.clevis_tokens(path) if slot in t.keyslots]
        if not bound:
            raise BindError(f"keyslot {slot} of {path} is not bound by a clevis token")
        token = bound[0]
        clevis_hdr = protected_header(token.jwe["protected"]).get("clevis", {})
        url = clevis_hdr.get("tang", {}).get("url") if clevis_hdr.get("pin") == "tang" else None
        if not isinstance(url, str):
            raise BindError(f"keyslot {slot} is bound to {token.pins()}: rebind handles tang only")
        secret = clevis.decrypt(token.compact(), f"clevis token {token.id} ({token.pins()})")
        try:
            config = tang_config(url, thumbprint)
            compact = clevis.encrypt("tang", config, bytes(secret), trust=thumbprint is None)
        finally:
            secret[:] = bytes(len(secret))
        luks.set_clevis_jwe(path, token.id, split_compact(compact))
    except (VmshieldError, OSError, ValueError) as e:
        if isinstance(e, KeystoreError):
            raise
        raise image_error(BindError, e, path, "password") from e
    return Bound(slot, f"tang {url}", tuple(signing_thumbprints(compact)))
