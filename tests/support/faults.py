"""Real faults for the disk tests: a tiny tmpfs that fills up, a loop device over it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def can_mount() -> bool:
    """Root with loop devices: what the fault tests need (CI runs as root)."""
    return os.geteuid() == 0 and os.path.exists("/dev/loop-control")


@contextmanager
def tiny_tmpfs(size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted for the test: writes past it fail with ENOSPC."""
    where = Path(tempfile.mkdtemp(prefix="vmsfs", dir="/tmp"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "vmshield-test", str(where)],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


@contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """/dev/loopN over `backing`, detached afterwards.

    Over a file on a full tmpfs, its write-back fails: the loop driver gets ENOSPC from the
    file and the block device's fdatasync reports EIO once, as a failing disk would.
    """
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
