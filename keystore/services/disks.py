"""Disk workflows of the keystore, through nbd_plugin.luks (no click).

The user's password is the passphrase of their LUKS keyslot: `create_disk` checks it,
records the disk and makes the image with it (a failed image leaves the record `failed`,
never a `ready` disk without an image); `rekey` moves every disk of a user from the old to
the new password (undoing the ones already done if one fails, so password and keyslots
never disagree).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from keystore import paths
from keystore.errors import Conflict, KeystoreError
from keystore.models import Disk, DiskState, Vm
from keystore.repository import Repository
from keystore.services import verifier
from keystore.services.store import Keystore

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
SECTOR = 512


class DiskOpError(KeystoreError):
    """An image operation failed; the message comes from the disk side (never a secret)."""


class NotTheRecordedImage(Conflict):
    """The file at a disk's path is not the image that was recorded: refused, untouched."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """What an image is: its LUKS UUID (None once crypto-erased) and its inode."""

    luks_uuid: str | None
    st_dev: int
    st_ino: int


def identity(path: str) -> Identity:
    """The identity of the image at `path` (not through a symlink: the stored path is
    canonical, so a symlink there now is not the recorded file)."""
    from nbd_plugin import luks
    from nbd_plugin.errors import VmshieldError

    st = os.lstat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise NotTheRecordedImage(f"{path} is not a regular file or block device any more")
    try:
        uuid: str | None = str(luks.info(path)["uuid"])
    except (VmshieldError, OSError, KeyError, ValueError):
        uuid = None
    return Identity(uuid, st.st_dev, st.st_ino)


def record_identity(store: Keystore, name: str, path: str, *, who: str) -> None:
    """Store what the image of disk `name` is now (after creating or importing it)."""
    now = identity(path)
    if now.luks_uuid is None:
        raise DiskOpError(f"{path} has no readable LUKS header: not recorded as disk {name}")
    store.run(
        lambda r: r.set_disk_identity(
            name, luks_uuid=str(now.luks_uuid), st_dev=now.st_dev, st_ino=now.st_ino, actor=who
        )
    )


def check_identity(disk: Disk, *, resuming: bool) -> None:
    """Refuse (NotTheRecordedImage) if the file at `disk.path` is another file than the one
    recorded, or holds another LUKS volume. `resuming`: an interrupted erase already wiped
    the header, so only the inode is compared. Records from before identities were kept
    (schema 1) have none to compare."""
    if disk.st_ino is None or disk.st_dev is None:
        return
    now = identity(disk.path)
    hint = f"refusing to erase it; `vmshield disk forget {disk.name}` drops the record"
    if (now.st_dev, now.st_ino) != (disk.st_dev, disk.st_ino):
        raise NotTheRecordedImage(
            f"disk {disk.name!r}: {disk.path} is another file than the recorded image "
            f"(device {now.st_dev} inode {now.st_ino}, recorded {disk.st_dev}/{disk.st_ino}); "
            + hint
        )
    if not resuming and disk.luks_uuid is not None and now.luks_uuid != disk.luks_uuid:
        raise NotTheRecordedImage(
            f"disk {disk.name!r}: {disk.path} holds LUKS volume {now.luks_uuid or 'none'}, "
            f"recorded {disk.luks_uuid}; " + hint
        )


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


async def next_name(repo: Repository, vm: str) -> str:
    """The first free default disk name of `vm`: VM-0, VM-1, ..."""
    taken = {d.name for d in await repo.list_disks()}
    v = await repo.get_vm(vm)
    n = 0
    while f"{v.name}-{n}" in taken:
        n += 1
    return f"{v.name}-{n}"


def create_disk(
    store: Keystore,
    vm: Vm,
    name: str,
    path: Path,
    size: int,
    password: bytes,
    *,
    fmt: str,
    cipher: str,
    iterations: int | None,
    iter_time_ms: int,
    who: str,
) -> None:
    """Authenticate `vm`'s owner with `password`, record the disk, create its image.

    The record is `creating` while the image is written, then `ready`; if the image cannot
    be created it stays recorded as `failed` with the reason (DiskOpError is raised).
    """
    paths.check_disk_name(name)
    store.run(lambda r: r.authenticate(vm.owner, password, actor=who))
    store.run(
        lambda r: r.add_disk(vm.name, name, str(path), fmt=fmt, cipher=cipher, size=size, actor=who)
    )
    try:
        create(
            path,
            size,
            password,
            fmt=fmt,
            cipher=cipher,
            iterations=iterations,
            iter_time_ms=iter_time_ms,
        )
        record_identity(store, name, str(path), who=who)
    except DiskOpError as e:
        error = {"error": str(e)}
        store.run(lambda r: r.set_disk_state(name, DiskState.FAILED, actor=who, detail=error))
        raise
    store.run(lambda r: r.set_disk_state(name, DiskState.READY, actor=who))
    # the new keyslot may cost more than the owner's verifier: raise the verifier to it (an
    # authentication through the covering policy rehashes; issue 20 B5)
    policy = verifier.covering_policy([str(path)])
    store.run(lambda r: r.authenticate(vm.owner, password, actor=who), policy=policy)


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
