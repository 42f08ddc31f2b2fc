"""Replacing a file whole, safely in any directory (one another user may write).

Another user who can write to the directory may plant symlinks or files at the name. So the
file is replaced atomically through a descriptor of its directory: written to a new
temporary name (random, O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file or a link),
fsynced, renamed over the final name (rename replaces a link, it does not follow it), and the
directory fsynced. Erase's journal and certificate, the keystore's job files, the
password-change journal and the libvirt hook with its hook.conf are all written so.
"""

from __future__ import annotations

import contextlib
import os
import secrets

from nbd_plugin.osutil.io import pwrite_all


def open_dir(path: str, *, create_mode: int | None = None) -> int:
    """A descriptor of the directory holding `path` (created with `create_mode` if given)."""
    directory = os.path.dirname(os.path.abspath(path))
    if create_mode is not None:
        os.makedirs(directory, mode=create_mode, exist_ok=True)
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def replace_file(path: str, blob: bytes, mode: int, *, create_dir: int | None = None) -> None:
    """Make `path` hold exactly `blob` (file mode `mode`), atomically and durably."""
    name = os.path.basename(path)
    dfd = open_dir(path, create_mode=create_dir)
    try:
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, mode, dir_fd=dfd)
        try:
            try:
                os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
                pwrite_all(fd, blob, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)
