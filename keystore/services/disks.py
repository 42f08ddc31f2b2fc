"""Disk workflows of the keystore, through nbd_plugin.luks (no click).

The user's password is the passphrase of their LUKS keyslot: `create_disk` checks it,
records the disk and makes the image with it (a failed or interrupted create removes the
partial image and the record again: never a `ready` disk without an image, never a stuck
`creating` one); `change_key` moves one image's keyslot (keystore.services.passwd moves
every disk of a user).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import tempfile
from pathlib import Path

from keystore import paths, sizes
from keystore.errors import AlreadyExists, Conflict, KeystoreError
from keystore.models import Disk, DiskState, Vm
from keystore.repository import Repository
from keystore.services import creating, interrupts, verifier
from keystore.services.progress import Progress, Report, silent
from keystore.services.store import Keystore
from nbd_plugin.errors import VmshieldError


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
    except OSError as e:
        raise DiskOpError(creation_error(path, size, e)) from e


def creation_error(path: Path, size: int, exc: OSError) -> str:
    """One line for an OSError that stopped creating the image `path` of `size` bytes:
    the path, and for EFBIG the largest file the filesystem there allows."""
    if exc.errno == errno.EFBIG:
        limit = max_file_size(path.parent)
        most = "" if limit is None else f" (at most {sizes.human(limit)} = {limit} bytes)"
        return (
            f"cannot create {path}: {sizes.human(size)} is more than the filesystem of "
            f"{path.parent} allows for one file{most}; choose a smaller --size, or a --path "
            "on another filesystem"
        )
    return f"cannot create {path}: {exc.strerror or exc}"


def max_file_size(directory: Path) -> int | None:
    """The largest size a file in `directory` may have (the filesystem's limit, or a lower
    `ulimit -f`), found by resizing an unlinked sparse file: no data is written and nothing
    is left behind. None if no file can be made there."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".vmshield-size-", dir=directory)
    except OSError:
        return None
    try:
        os.unlink(tmp)
        low, high = 0, sizes.MAX_SIZE  # low always fits
        while low < high:
            mid = (low + high + 1) // 2
            try:
                os.ftruncate(fd, mid)
                low = mid
            except OSError:
                high = mid - 1
        return low
    finally:
        os.close(fd)


async def next_name(repo: Repository, vm: str) -> str:
    """The first free default disk name of `vm`: VM-0, VM-1, ..."""
    taken = {d.name for d in await repo.list_disks()}
    v = await repo.get_vm(vm)
    n = 0
    while f"{v.name}-{n}" in taken:
        n += 1
    return f"{v.name}-{n}"


def new_name(store: Keystore, vm_name: str, name: str | None) -> tuple[Vm, str]:
    """The VM and the name of its new disk: `name`, else its first free VM-N; a reserved
    name is refused (ReservedName) before anything is asked or made."""
    vm = store.run(lambda r: r.get_vm(vm_name))
    chosen = name or store.run(lambda r: next_name(r, vm_name))
    return vm, paths.check_disk_name(chosen)


def new_image_path(store: Keystore, name: str, given: Path | None) -> Path:
    """Where disk `name`'s new image goes: `given`, else disks/NAME.img next to the keystore
    file; refused (AlreadyExists) if something is there already."""
    path = (given or paths.default_image_dir(store.path) / f"{name}.img").absolute()
    if os.path.lexists(path):
        raise AlreadyExists(f"{path} already exists; choose another --path")
    return path


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
    progress: Report = silent,
) -> None:
    """Authenticate `vm`'s owner with `password`, record the disk, create its image.
    `progress` gets a line as each of the three steps begins (the password check, the
    image with its keyslot, the owner's verifier), with the time left.

    The record is `creating` while the image is written, then `ready`. If anything stops
    it (the image cannot be made, the keystore fails, SIGINT/SIGTERM/SIGHUP), what was made
    is removed again, the partial image and the record, with an audit row saying why. A
    signal is acted on between steps (a step is not cut in half: the KDF runs to its end)
    and ends it with `Interrupted` (exit 130 for Ctrl-C). SIGKILL leaves the `creating`
    record and its marker: the next command that meets them finishes the undo
    (keystore.services.creating).
    """
    paths.check_disk_name(name)
    steps = Progress(progress, 3, estimate=iter_time_ms / 1000)
    with interrupts.deferred_signals() as stop, creating.creating(store, name, path):
        steps.step(f"checking the password of {vm.owner}")
        store.run(lambda r: r.authenticate(vm.owner, password, actor=who, vm=vm.name))
        _stop_if(stop, name)
        store.run(
            lambda r: r.add_disk(
                vm.name, name, str(path), fmt=fmt, cipher=cipher, size=size, actor=who
            )
        )
        made = False
        try:
            _stop_if(stop, name)
            steps.step(f"writing {path} and its keyslot")
            create(
                path,
                size,
                password,
                fmt=fmt,
                cipher=cipher,
                iterations=iterations,
                iter_time_ms=iter_time_ms,
            )
            made = True
            _stop_if(stop, name)
            record_identity(store, name, str(path), who=who)
            _stop_if(stop, name)
            store.run(lambda r: r.set_disk_state(name, DiskState.READY, actor=who))
        except BaseException as e:
            _undo_create(store, vm, name, path, made, e, who=who)
            raise
    # the new keyslot may cost more than the owner's verifier: raise the verifier to it (an
    # authentication through the covering policy rehashes; issue 20 B5)
    policy = verifier.covering_policy([str(path)])
    steps.step(f"the keystore verifier of {vm.owner}")
    store.run(lambda r: r.authenticate(vm.owner, password, actor=who, vm=vm.name), policy=policy)


def _stop_if(stop: interrupts.Pending, name: str) -> None:
    if stop.signum is not None:
        raise interrupts.Interrupted(f"disk create {name} interrupted by {stop.name}", stop.signum)


def _undo_create(
    store: Keystore, vm: Vm, name: str, path: Path, made: bool, cause: BaseException, *, who: str
) -> None:
    """Remove what an unfinished `create_disk` made (signals are already deferred); the
    message of `cause` then says what is left, if anything."""
    left: list[str] = []
    if made:  # a failed create_image removes its own partial file
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            left.append(f"{path} could not be removed ({e.strerror})")
    detail = {"disk": name, "path": str(path), "error": str(cause) or type(cause).__name__}
    try:
        store.run(lambda r: r.append_audit(who, "disk.create.undone", vm.name, detail))
        store.run(lambda r: r.forget_disk(name, actor=who))
    except (KeystoreError, OSError) as e:
        left.append(f"its record could not be removed ({e}): `vmshield disk forget {name}`")
    if isinstance(cause, VmshieldError) and cause.args:
        undone = "; ".join(left) if left else "nothing was left behind"
        cause.args = (f"{cause.args[0]} ({undone})", *cause.args[1:])


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
