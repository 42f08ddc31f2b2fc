"""The one policy for new secrets and new images, whichever command makes them.

A user's password (`user add`, `user passwd`) is also the LUKS passphrase of that user's
keyslot on every disk (`disk create` writes it), and `image create`, `image add-key` and
`image passwd` write a passphrase of their own: all of them are new secrets and pass
`check_new_secret`, with the one minimum length below. New images, from `disk create` and
`image create` alike, are LUKS2 with an argon2id keyslot unless `--format luks1` is asked
for: QEMU's own luks driver and nbdkit's luks filter open LUKS1 only.
"""

from __future__ import annotations

#: the shortest new password or passphrase accepted, in bytes
MIN_LENGTH = 8

#: the format of a new image or disk
NEW_IMAGE_FORMAT = "luks2"

#: what the --format help of every creating command says about other readers
FORMAT_HELP = (
    "Container format: luks2 (argon2id keyslot, 4096-byte sectors; --pbkdf-iterations makes "
    "it a PBKDF2 keyslot) or luks1. QEMU's own luks driver (qemu-img, -blockdev driver=luks) "
    "and nbdkit's luks filter open LUKS1 only: choose luks1 for an image they must open; "
    "vmshield and cryptsetup open both."
)


def check_new_secret(secret: bytes, noun: str = "password") -> None:
    """ValueError if `secret` cannot be a new password or passphrase: shorter than
    MIN_LENGTH, or holding a newline, a carriage return or NUL (it could not be typed,
    piped or kept in a key file the same way twice: a line read from a CRLF pipe keeps its
    "\r", nbd_plugin.secrets)."""
    if len(secret) < MIN_LENGTH:
        raise ValueError(f"{noun} too short: use at least {MIN_LENGTH} characters")
    if b"\n" in secret or b"\r" in secret or b"\0" in secret:
        raise ValueError(f"{noun} must not contain newlines, carriage returns or NUL bytes")
