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

from keystore.errors import KeystoreError
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


def signing_thumbprints(jwe_compact: bytes) -> list[str]:
    """Thumbprints of the Tang signing keys a tang JWE was made with (to show the admin)."""
    from nbd_plugin.luks.luks2.tokens import protected_header

    header = protected_header(jwe_compact.split(b".")[0].decode("ascii"))
    keys = header.get("clevis", {}).get("tang", {}).get("adv", {}).get("keys", [])
    return [jwk_thumbprint(k) for k in keys if "verify" in k.get("key_ops", [])]


@dataclass(frozen=True)
class Bound:
    keyslot: int
    pins: str
    thumbprints: tuple[str, ...]


def _disk_error(e: Exception, path: str) -> BindError:
    from nbd_plugin.errors import ImageBusy, InvalidPassphrase

    if isinstance(e, ImageBusy):
        return BindError(f"{path} is in use (served read-write?): stop it first")
    if isinstance(e, InvalidPassphrase):
        return BindError(f"no keyslot of {path} opens with that password")
    return BindError(f"{path}: {e}")


def tang_config(url: str, thumbprint: str | None) -> dict[str, Any]:
    if not url.startswith(("http://", "https://")):
        raise BindError(f"--url {url!r}: a Tang URL starts with http:// or https://")
    config: dict[str, Any] = {"url": url}
    if thumbprint:
        config["thp"] = thumbprint
    return config


def bind(path: str, owner_password: bytes, pin: str, config: dict[str, Any]) -> Bound:
    """Add a keyslot for a random passphrase and its clevis token for ``pin``/``config``."""
    from nbd_plugin import luks
    from nbd_plugin.errors import VmshieldError
    from nbd_plugin.luks.luks2.tokens import ClevisToken, split_compact

    secret = clevis.new_passphrase()
    try:
        compact = clevis.encrypt(pin, config, bytes(secret), trust="thp" not in config)
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
            raise _disk_error(e, path) from e
    finally:
        secret[:] = bytes(len(secret))
    pins = ClevisToken(-1, (slot,), jwe).pins()
    thps = tuple(signing_thumbprints(compact)) if pin == "tang" else ()
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
        raise _disk_error(e, path) from e
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
        raise _disk_error(e, path) from e
    return Bound(slot, f"tang {url}", tuple(signing_thumbprints(compact)))


def bindings(path: str) -> list[dict[str, Any]]:
    """Every clevis token of the image: its id, keyslots and pins (for `disk bindings`)."""
    from nbd_plugin import luks

    return [
        {"token": t.id, "keyslots": list(t.keyslots), "pins": t.pins()}
        for t in luks.clevis_tokens(path)
    ]
