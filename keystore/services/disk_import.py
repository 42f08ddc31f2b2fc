"""Registering an existing LUKS image as a disk of a VM (`vmshield disk import`).

For images the keystore does not know: made by an earlier keystore that was lost, or by
cryptsetup. Nothing is written to the image. It is checked before anything is recorded:
a LUKS1/LUKS2 header, no other disk record for the same file or LUKS volume (a copy has the
same LUKS UUID: two records of one volume would erase and serve each other's data), nobody
holding it (a server outside vmshield), and a keyslot that opens with the VM owner's
password (which the keystore also verifies, counting failures toward the lockout). Then the
disk is recorded as `disk create` records it (format, cipher, plaintext size, identity)
and the import is audited.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from keystore.errors import AlreadyExists, Conflict
from keystore.models import Disk, DiskState, Vm
from keystore.repository import canonical_path
from keystore.services import usage, verifier
from keystore.services.disks import DiskOpError, identity, record_identity
from keystore.services.store import Keystore


class ImageInUse(Conflict):
    """A process holds the image (a server outside vmshield): it is not imported."""


@dataclass(frozen=True)
class Found:
    """What the header of an image to import says (no passphrase needed)."""

    path: str
    fmt: str
    cipher: str
    size: int
    luks_uuid: str


def inspect(path: Path) -> Found:
    """The image at `path`, canonical, if it is a LUKS1/LUKS2 regular file or block device;
    DiskOpError (one line) otherwise."""
    from nbd_plugin import luks
    from nbd_plugin.errors import VmshieldError

    real = canonical_path(str(path))
    try:
        st = os.stat(real)
    except OSError as e:
        raise DiskOpError(f"cannot import {path}: {e.strerror}") from e
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise DiskOpError(f"cannot import {path}: not a regular file or block device")
    try:
        meta = luks.info(real)
    except (VmshieldError, OSError, ValueError) as e:
        raise DiskOpError(f"cannot import {path}: {e}") from e
    return Found(real, str(meta["format"]), str(meta["cipher"]), int(meta["size"]),
                 str(meta["uuid"]))  # fmt: skip


def check_unregistered(found: Found, disks: list[Disk]) -> None:
    """AlreadyExists naming the disk if one record is this file or this LUKS volume."""
    now = identity(found.path)
    for d in disks:
        same_file = (d.st_dev, d.st_ino) == (now.st_dev, now.st_ino)
        if d.path == found.path or same_file:
            raise AlreadyExists(f"{found.path} is already disk {d.name} of VM {d.vm}")
        if d.luks_uuid == found.luks_uuid and d.state != DiskState.DESTROYED:
            raise AlreadyExists(
                f"{found.path} holds LUKS volume {found.luks_uuid}, already recorded as disk "
                f"{d.name} of VM {d.vm} ({d.path}): a copy is not imported beside its original"
            )


def check_not_held(found: Found) -> None:
    """ImageInUse naming the processes that lock the image."""
    held = usage.holders(found.path)
    if held:
        who = "; ".join(str(p) for p in held)
        raise ImageInUse(f"{found.path} is in use by {who}: stop it before importing")


def check_keyslot(found: Found, password: bytes, owner: str) -> None:
    """DiskOpError unless a keyslot of the image opens with `password` (read-only: nothing
    is written, a shared lock while it is open)."""
    from nbd_plugin import luks
    from nbd_plugin.errors import ImageBusy, InvalidPassphrase, VmshieldError

    try:
        luks.open_volume(found.path, password, readonly=True).close()
    except InvalidPassphrase as e:
        raise DiskOpError(
            f"no keyslot of {found.path} opens with the password of {owner}: not imported "
            "(the owner's vmshield password must be a passphrase of the image)"
        ) from e
    except ImageBusy as e:
        raise ImageInUse(f"{found.path} is in use (served read-write?): stop it first") from e
    except (VmshieldError, OSError, ValueError) as e:
        raise DiskOpError(f"cannot import {found.path}: {e}") from e


def import_disk(
    store: Keystore, vm: Vm, name: str, found: Found, password: bytes, *, who: str
) -> Disk:
    """Check `found` against the keystore and the owner's `password`, then record it as
    disk `name` of `vm`, ready to serve. A failure after the record was added removes it
    again."""
    check_unregistered(found, store.run(lambda r: r.list_disks()))
    check_not_held(found)
    store.run(lambda r: r.authenticate(vm.owner, password, actor=who, vm=vm.name))
    check_keyslot(found, password, vm.owner)
    store.run(
        lambda r: r.add_disk(
            vm.name, name, found.path, fmt=found.fmt, cipher=found.cipher, size=found.size,
            actor=who,
        )
    )  # fmt: skip
    try:
        record_identity(store, name, found.path, who=who)
        detail = {
            "disk": name,
            "path": found.path,
            "format": found.fmt,
            "cipher": found.cipher,
            "size": found.size,
            "luks_uuid": found.luks_uuid,
        }
        store.run(lambda r: r.append_audit(who, "disk.import", vm.name, detail))
        store.run(lambda r: r.set_disk_state(name, DiskState.READY, actor=who))
    except BaseException:
        store.run(lambda r: r.forget_disk(name, actor=who))
        raise
    # the imported keyslot may cost more than the owner's verifier: raise it (issue 20 B5)
    policy = verifier.covering_policy([found.path])
    store.run(lambda r: r.authenticate(vm.owner, password, actor=who, vm=vm.name), policy=policy)
    return store.run(lambda r: r.get_disk(name))
