"""Where the keystore lives by default, and where served disks put their sockets."""

from __future__ import annotations

import os
from pathlib import Path

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

    /run/vmshield for root; `$XDG_RUNTIME_DIR/vmshield` or /tmp/vmshield-UID otherwise
    (kept short: unix socket paths are limited to ~107 bytes).
    """
    if _is_root():
        return SYSTEM_RUN_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "vmshield"
    return Path(f"/tmp/vmshield-{os.getuid()}")


def default_image_dir(db_path: Path) -> Path:
    """Images created by `vmshield disk create` go next to the database, in `disks/`."""
    return db_path.parent / "disks"
