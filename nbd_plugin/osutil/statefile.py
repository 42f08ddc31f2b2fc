"""Small JSON state files a long-running process publishes for others to read.

A server's I/O counters (nbd_plugin/serve/stats.py) and usbgate's attached devices are
written here for `vmshield status`: replaced whole by rename, so a reader sees the previous
or the next version, never half of one; mode 0600 in the writer's private run directory.
A reader refuses a link, anything but a regular file and anything oversized.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

#: the largest state file read
MAX_STATE_BYTES = 1 << 16


def publish(path: str | Path, state: dict[str, Any]) -> None:
    """Replace `path` with `state` as JSON (write a temporary file beside it, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of a killed writer with this pid
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        os.write(fd, json.dumps(state, sort_keys=True).encode())
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read(path: str | Path) -> dict[str, Any] | None:
    """The state in `path`; None if it is missing, not a regular file, too big or not a
    JSON object."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        blob = os.read(fd, MAX_STATE_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(blob) > MAX_STATE_BYTES:
        return None
    try:
        state = json.loads(blob)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None
