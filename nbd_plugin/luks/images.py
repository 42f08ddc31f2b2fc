"""LUKS images named by their path: probe, create, open, change keyslots, describe.

Everything above the LUKS library (the plugin, the CLI, erase) works through these functions.
Each opens the file, takes the lock (``osutil.locking``), finds the format (``formats``) and
hands the descriptor to that format's module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nbd_plugin.errors import ImageError, UnsupportedError
from nbd_plugin.luks.formats import MODULES, Format, Region, probe_fd
from nbd_plugin.luks.luks2 import image as luks2_image
from nbd_plugin.luks.luks2.tokens import ClevisToken
from nbd_plugin.luks.policy import NewImage
from nbd_plugin.luks.volume import Volume
from nbd_plugin.osutil.locking import hold_image


def open_fd(path: str, readonly: bool) -> int:
    """Open an image file or device; ImageError naming the reason."""
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        mode = "reading" if readonly else "reading and writing"
        raise ImageError(f"{path}: permission denied opening it for {mode}") from None


def probe(path: str) -> str:
    """ "luks1" or "luks2"; ImageError if the file is not a LUKS image."""
    fd = open_fd(path, True)
    try:
        return probe_fd(fd, path)
    finally:
        os.close(fd)


def open_volume(
    path: str, passphrase: bytes, *, readonly: bool, keyslot: int | None = None
) -> Volume:
    """Open, lock and unlock an image (with ``keyslot`` only, if given). Nothing is written;
    a failure leaves no lock behind."""
    fd = open_fd(path, readonly)
    try:
        hold_image(fd, path, exclusive=not readonly)
        return MODULES[probe_fd(fd, path)].open_volume(fd, path, passphrase, readonly, keyslot)
    except BaseException:
        os.close(fd)
        raise


def create_image(
    path: str,
    size: int,
    passphrase: bytes,
    *,
    fmt: str = "luks1",
    cipher: str = "aes-xts-plain64",
    key_bytes: int = 64,
    hash: str = "sha256",
    iterations: int | None = None,
    iter_time_ms: int = 2000,
    **fmt_opts: Any,
) -> None:
    """Create a new image file; refuses to overwrite an existing one."""
    cipher_name, _, mode = cipher.partition("-")
    module = MODULES.get(fmt)
    if module is None:
        raise UnsupportedError(f"format {fmt!r} is not supported (use luks1 or luks2)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ImageError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        hold_image(fd, path, exclusive=True)
        new = NewImage(cipher_name, mode, key_bytes, hash, iterations, iter_time_ms)
        module.create(fd, size, passphrase, new, **fmt_opts)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


@contextmanager
def _for_change(path: str) -> Iterator[tuple[int, Format]]:
    """The image open read-write under the exclusive lock a keyslot change needs."""
    fd = open_fd(path, False)
    try:
        hold_image(fd, path, exclusive=True)
        yield fd, MODULES[probe_fd(fd, path)]
    finally:
        os.close(fd)


def add_key(path: str, passphrase: bytes, new_passphrase: bytes, **opts: Any) -> int:
    """Add a passphrase; returns the keyslot used."""
    with _for_change(path) as (fd, module):
        return module.add_key(fd, passphrase, new_passphrase, **opts)


def clevis_tokens(path: str) -> list[ClevisToken]:
    """The clevis tokens of a LUKS2 image (LUKS1 has none vmshield reads)."""
    fd = open_fd(path, True)
    try:
        if probe_fd(fd, path) != "luks2":
            return []
        return luks2_image.clevis_tokens(fd, path)
    finally:
        os.close(fd)


def add_clevis_key(
    path: str, passphrase: bytes, new_passphrase: bytes, jwe: dict[str, str], **opts: Any
) -> int:
    """Add ``new_passphrase`` and its clevis token (LUKS2 only); returns the keyslot used."""
    with _for_change(path) as (fd, module):
        if module is not luks2_image:
            raise UnsupportedError(f"{path}: clevis tokens need a LUKS2 image")
        return luks2_image.add_key(fd, passphrase, new_passphrase, clevis_jwe=jwe, **opts)


def set_clevis_jwe(path: str, token_id: int, jwe: dict[str, str]) -> None:
    """Replace the JWE of a LUKS2 image's clevis token (``clevis luks regen``)."""
    with _for_change(path) as (fd, module):
        if module is not luks2_image:
            raise UnsupportedError(f"{path}: clevis tokens need a LUKS2 image")
        luks2_image.set_clevis_jwe(fd, token_id, jwe)


def kill_slot(path: str, passphrase: bytes, slot: int) -> int:
    """Remove keyslot ``slot`` of a LUKS2 image (and its clevis token), authorised by the
    passphrase of another keyslot."""
    with _for_change(path) as (fd, module):
        if module is not luks2_image:
            raise UnsupportedError(f"{path}: removing a keyslot by number needs LUKS2")
        return luks2_image.kill_slot(fd, passphrase, slot)


def remove_key(path: str, passphrase: bytes, *, allow_last: bool = False) -> int:
    """Remove the keyslot ``passphrase`` opens; returns its index."""
    with _for_change(path) as (fd, module):
        return module.remove_key(fd, passphrase, allow_last=allow_last)


def change_key(path: str, passphrase: bytes, new_passphrase: bytes, **opts: Any) -> int:
    """Replace a passphrase; returns the keyslot now holding the new one."""
    with _for_change(path) as (fd, module):
        return module.change_key(fd, passphrase, new_passphrase, **opts)


def info(path: str) -> dict[str, Any]:
    """What the header says (no passphrase needed), as plain data for --json."""
    fd = open_fd(path, True)
    try:
        return MODULES[probe_fd(fd, path)].info(fd, path)
    finally:
        os.close(fd)


def key_material_regions(path: str) -> list[Region]:
    """(offset, length) byte ranges holding headers, digests and keyslot material."""
    fd = open_fd(path, True)
    try:
        return MODULES[probe_fd(fd, path)].key_material_regions(fd, path)
    finally:
        os.close(fd)


def payload_region(path: str) -> tuple[int, int]:
    """(offset, length) of the encrypted payload in bytes."""
    meta = info(path)
    return int(meta["payload_offset"]), int(meta["size"])
