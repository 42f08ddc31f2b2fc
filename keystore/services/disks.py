"""Disk-side operations the keystore CLI performs through nbd_plugin.luks.

The user's password is the passphrase of their LUKS keyslot: `create` makes the image
with it, `rekey` moves every disk of a user from the old to the new password (undoing
the ones already done if one fails, so password and keyslots never disagree).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from keystore.errors import KeystoreError
from keystore.models import Disk, DiskState

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
SECTOR = 512


class DiskOpError(KeystoreError):
    """An image operation failed; the message comes from the disk side (never a secret)."""


def parse_size(text: str) -> int:
    """`20G`, `512M`, `1T`, `1048576` -> bytes (binary units, like qemu-img)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"size {text!r}: use a number with an optional K, M, G, T suffix")
    size = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if size <= 0 or size % SECTOR:
        raise ValueError(f"size {text!r} must be a positive multiple of {SECTOR} bytes")
    return size


def create(
    path: Path,
    size: int,
    passphrase: bytes,
    *,
    fmt: str,
    cipher: str,
    iterations: int | None,
    iter_time_ms: int,
) -> None:
    """Create the LUKS image (mode 0600) with one keyslot for `passphrase`."""
    from nbd_plugin import luks
    from nbd_plugin.errors import VmshieldError

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        luks.create_image(
            str(path),
            size,
            passphrase,
            fmt=fmt,
            cipher=cipher,
            iterations=iterations,
            iter_time_ms=iter_time_ms,
        )
    except (VmshieldError, ValueError) as e:
        raise DiskOpError(f"cannot create {path}: {e}") from e


def change_key(
    path: str, old: bytes, new: bytes, *, iterations: int | None = None, iter_time_ms: int = 2000
) -> None:
    from nbd_plugin import luks
    from nbd_plugin.errors import ImageBusy, InvalidPassphrase, VmshieldError

    try:
        luks.change_key(path, old, new, iterations=iterations, iter_time_ms=iter_time_ms)
    except ImageBusy as e:
        raise DiskOpError("image is in use (served read-write?): stop it first") from e
    except InvalidPassphrase as e:
        raise DiskOpError("no keyslot opens with the current password") from e
    except (VmshieldError, OSError, ValueError) as e:
        raise DiskOpError(str(e)) from e


def rekey(
    disks: Sequence[Disk],
    old: bytes,
    new: bytes,
    *,
    iterations: int | None = None,
    iter_time_ms: int = 2000,
) -> list[tuple[str, str]]:
    """Change the keyslot passphrase of every live disk from `old` to `new`, all or none.

    Returns the failures as (disk, reason); when there are any, the disks already changed
    have been changed back. Only READY disks are changed (others have no usable image).
    """
    done: list[Disk] = []
    failures: list[tuple[str, str]] = []
    for d in disks:
        if d.state is not DiskState.READY:
            continue
        try:
            change_key(d.path, old, new, iterations=iterations, iter_time_ms=iter_time_ms)
            done.append(d)
        except DiskOpError as e:
            failures.append((d.name, str(e)))
    if failures:
        for d in done:
            try:
                change_key(d.path, new, old, iterations=iterations, iter_time_ms=iter_time_ms)
            except DiskOpError as e:
                failures.append(
                    (
                        d.name,
                        f"could not restore the old passphrase: {e}; "
                        "this disk now opens with the NEW password",
                    )
                )
    return failures
