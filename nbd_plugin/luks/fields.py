"""Fixed-size, NUL-padded text fields of the LUKS binary headers."""

from __future__ import annotations


def pack_text(value: str, size: int, name: str) -> bytes:
    """``value`` NUL-padded to ``size`` bytes; it must leave room for one terminating NUL."""
    raw = value.encode("utf-8")
    if len(raw) >= size:
        raise ValueError(f"{name} {value!r} is longer than {size - 1} bytes")
    return raw.ljust(size, b"\0")
