"""Fixed-size, NUL-padded text fields of the LUKS1 and LUKS2 binary headers.

Both formats store names (cipher, hash, checksum algorithm), the UUID and LUKS2's label and
subsystem as text NUL-padded to a fixed size; a field must leave room for one NUL.
"""

from __future__ import annotations

from nbd_plugin.errors import ImageError


def pack_text(value: str, size: int, name: str) -> bytes:
    """``value`` NUL-padded to ``size`` bytes; ValueError if it leaves no room for a NUL."""
    raw = value.encode("utf-8")
    if len(raw) >= size:
        raise ValueError(f"{name} {value!r} is longer than {size - 1} bytes")
    return raw.ljust(size, b"\0")


def ascii_text(raw: bytes, name: str, fmt: str) -> str:
    """The text before the first NUL; ImageError if it is not ASCII (a corrupt header)."""
    value = raw.split(b"\0", 1)[0]
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise ImageError(f"{fmt} header field {name} is not ASCII: header corrupt") from None


def display_text(raw: bytes) -> str:
    """The text before the first NUL, non-ASCII bytes replaced (free-form: labels)."""
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")
