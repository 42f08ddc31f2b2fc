"""Who is creating a disk, so that what a killed `disk create` left is cleaned up.

Ctrl-C, SIGTERM and a failure undo a create themselves (keystore.services.disks). SIGKILL,
a crash or a power cut cannot: they leave the `creating` record and perhaps a partial
image. So `disk create` first writes a marker, `<state dir>/creating/NAME.json` (the
keystore's state directory: keystore.services.store), naming its process (pid and start
time, with the boot it started in) and the image path, and removes it once the disk is
ready or undone. The next command that meets a `creating` record (`disk create`, `disk
list`, `disk serve`, `disk destroy`, `status`) calls `reap`: when the marker's process is
gone, the create was abandoned and `reap` finishes its undo (the partial image, then the
record, audited as `disk.create.abandoned`). The image file is removed only if it is a
regular file of this user's at the recorded path: `disk create` made it with O_EXCL there,
and the record, kept until the file is gone, reserves the path against another create.
A `creating` record without a marker (a create on another host sharing a PostgreSQL
keystore, or one by an older vmshield) is not touched: the note says what to run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keystore import paths
from keystore.errors import KeystoreError, NotFound
from keystore.models import Disk, DiskState
from keystore.services.store import Keystore

#: the largest marker read (a few hundred bytes are written)
MAX_MARKER = 4096


@dataclasses.dataclass(frozen=True)
class Creator:
    """The process creating a disk: pid, and its start (boot id + start ticks) so that a
    reused pid is not taken for it."""

    pid: int
    start: str
    path: str

    def alive(self) -> bool:
        return process_start(self.pid) == self.start


def process_start(pid: int) -> str | None:
    """`BOOT_ID:TICKS`, what tells a running process from a later one with its pid; None
    for no such process (a zombie counts as gone: it has exited)."""
    try:
        proc = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = proc[proc.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return f"{boot}:{fields[19]}"


def marker_dir(store: Keystore) -> Path:
    return store.state_dir() / "creating"


def _marker(store: Keystore, name: str) -> Path:
    return marker_dir(store) / f"{paths.check_disk_name(name)}.json"


@contextlib.contextmanager
def creating(store: Keystore, name: str, path: Path) -> Iterator[None]:
    """Marks disk `name` as being created by this process for the time of the block.

    The marker is written (atomically, mode 0600) before the block runs, so before the
    record exists, and removed when the block ends however it ends, except by SIGKILL."""
    start = process_start(os.getpid())
    marker = _marker(store, name)
    blob = json.dumps({"pid": os.getpid(), "start": start, "path": str(path)}).encode()
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    try:
        paths.private_dir(marker.parent)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a killed create that had this pid
        fd = os.open(tmp, paths.NEW_FILE, 0o600)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, marker)
    except OSError as e:
        raise KeystoreError(
            f"cannot write {marker} (what a killed create leaves is found by it): {e.strerror or e}"
        ) from None
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()


def read_creator(store: Keystore, name: str) -> Creator | None:
    """The process the marker of disk `name` names; None without a (readable) marker."""
    try:
        fd = os.open(_marker(store, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, KeystoreError):
        return None
    try:
        data: Any = json.loads(os.read(fd, MAX_MARKER))
        return Creator(int(data["pid"]), str(data["start"]), str(data["path"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)


def reap(store: Keystore, *, who: str) -> list[str]:
    """Finish the undo of every `creating` disk whose creator is gone; one note per disk
    for the caller to show (what was removed, or what to run)."""
    abandoned = [d for d in store.run(lambda r: r.list_disks()) if d.state is DiskState.CREATING]
    notes: list[str] = []
    for d in abandoned:
        creator = read_creator(store, d.name)
        if creator is None and _still_creating(store, d.name):  # not just made ready
            notes.append(
                f"disk {d.name} is `creating` but no `disk create` on this host is making "
                f"it: if none runs elsewhere, run `rm -f {d.path}` (the partial image, if "
                f"any) and `vmshield disk forget {d.name} --yes`"
            )
        elif creator is not None and not creator.alive():
            note = _finish_undo(store, d, creator, who=who)
            if note:
                notes.append(note)
    _drop_stale_markers(store)
    return notes


def _still_creating(store: Keystore, name: str) -> bool:
    try:
        return store.run(lambda r: r.get_disk(name)).state is DiskState.CREATING
    except NotFound:
        return False


def _finish_undo(store: Keystore, d: Disk, creator: Creator, *, who: str) -> str | None:
    if read_creator(store, d.name) != creator or not _still_creating(store, d.name):
        return None  # another command finished it, and a new create may have begun
    removed = _remove_partial(Path(d.path))
    detail = {"disk": d.name, "path": d.path, "creator_pid": creator.pid, "image": removed}
    try:
        store.run(lambda r: r.append_audit(who, "disk.create.abandoned", d.vm, detail))
        store.run(lambda r: r.forget_disk(d.name, actor=who))
    except NotFound:  # another command finished it first
        pass
    with contextlib.suppress(FileNotFoundError, KeystoreError):
        _marker(store, d.name).unlink()
    what = {
        "removed": f"removed its partial image {d.path} and its record",
        "absent": "removed its record (no image had been made)",
    }.get(removed, f"removed its record; {d.path} was left: {removed}")
    return f"disk {d.name}: its `disk create` (pid {creator.pid}) was killed; {what}"


def _remove_partial(path: Path) -> str:
    """Remove the image a killed create left at `path`: "removed", "absent", or why not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"it belongs to uid {st.st_uid}"
    try:
        path.unlink()
    except FileNotFoundError:
        return "absent"
    except OSError as e:
        return e.strerror or str(e)
    return "removed"


def _drop_stale_markers(store: Keystore) -> None:
    """Markers whose process is gone and whose disk is no longer `creating` (killed after
    `ready`, or before recording the disk): nothing left to undo."""
    directory = marker_dir(store)
    try:
        names = [p.stem for p in directory.glob("*.json")]
    except OSError:
        return
    if not names:
        return
    creating = {d.name for d in store.run(lambda r: r.list_disks())
                if d.state is DiskState.CREATING}  # fmt: skip
    for name in names:
        creator = read_creator(store, name)
        if name not in creating and (creator is None or not creator.alive()):
            with contextlib.suppress(OSError):
                (directory / f"{name}.json").unlink()
