"""Where the keystore lives by default, and where served disks put their sockets."""

from __future__ import annotations

import os
import re
from pathlib import Path

from keystore.errors import KeystoreError
from nbd_plugin import trust

#: Environment variable that overrides the default database path (as `--db` does).
DB_ENV = "VMSHIELD_DB"

SYSTEM_DB = Path("/var/lib/vmshield/keystore.db")
SYSTEM_RUN_DIR = Path("/run/vmshield")


def _is_root() -> bool:
    return os.geteuid() == 0


def default_db_path() -> Path:
    """`$VMSHIELD_DB`, else /var/lib/vmshield/keystore.db for root, else the XDG data dir."""
    env = os.environ.get(DB_ENV)
    if env:
        return Path(env)
    if _is_root():
        return SYSTEM_DB
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "vmshield" / "keystore.db"


def default_run_dir() -> Path:
    """Directory for NBD sockets, pid files and server logs of `vmshield disk serve`.

    /run/vmshield for root; `$XDG_RUNTIME_DIR/vmshield` otherwise (kept short: unix socket
    paths are limited to ~107 bytes). There is no fallback in /tmp: a name there can be
    taken first by another local user. Without $XDG_RUNTIME_DIR, NoRunDir says what to do.
    """
    if _is_root():
        return SYSTEM_RUN_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "vmshield"
    raise NoRunDir(
        "no $XDG_RUNTIME_DIR (it is set by a login session): give --socket in a directory "
        "only you can write (e.g. one made by `mktemp -d`), or run in a login session"
    )


class NoRunDir(KeystoreError):
    """A non-root user has no private runtime directory for the server's socket."""


#: a file this process creates and no one else had: never follows a link, never reuses
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def private_dir(path: Path) -> Path:
    """`path` as a directory no one but root or this user can write (nbd_plugin.trust: it and
    every directory above it, no symlink), made 0700 if missing; UnsafeDirectory if not:
    whoever can write the directory can swap the socket or plant a symlink."""
    try:
        return trust.private_dir(path)
    except trust.Untrusted as e:
        raise UnsafeDirectory(
            f"{e}: someone else may control what is in it; fix or remove it, or choose "
            "another --socket"
        ) from None


class UnsafeDirectory(KeystoreError):
    """A directory for a server's socket, pid or log file that others could tamper with."""


def default_image_dir(db_path: Path) -> Path:
    """Images created by `vmshield disk create` go next to the database, in `disks/`."""
    return db_path.parent / "disks"


#: Disk names whose run-directory files would be another's: a disk's files are DISK.sock,
#: DISK.pid, DISK.log, DISK.stats and DISK.lease.log; a VM's are VM-usb.sock (usbgate's
#: listener), VM-usbN.sock (usb-redir slots), VM-usbgate.pid/.log/.state and VM.domain.
#: So a disk named `web-usb`, `web-usb0` or `web-usbgate` would take VM web's usbgate
#: socket, slot or pid/log file, and one named `web-0.lease` disk web-0's lease log. Such
#: names are refused (for any VM, existing or future: the rule needs no lookup and cannot
#: race).
_RESERVED_DISK_NAME = re.compile(r"(-usb(gate|[0-9]*)|\.lease)$")


class ReservedName(KeystoreError):
    """A disk name whose sockets or pid/log files would collide with a VM's or a disk's."""


def check_disk_name(name: str) -> str:
    """`name`, or ReservedName if its run-directory files could be another's."""
    m = _RESERVED_DISK_NAME.search(name)
    if m:
        raise ReservedName(
            f"disk name {name!r} is reserved: names ending in -usb, -usbN, -usbgate or .lease "
            "would share the run directory's sockets and pid/log files of a VM's usbgate or of "
            "another disk; choose another name"
        )
    return name
