"""Files erase writes beside its target (journal, certificate), safe in a shared directory.

Another user who can write to the image's directory may plant symlinks or files at the names
erase uses. So a file is replaced atomically through a descriptor of its directory: written
to a new temporary name (random, O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file or a
link), fsynced, renamed over the final name (rename replaces a link, it does not follow it),
and the directory fsynced. Reading refuses links and files another user could have written
(nbd_plugin.trust).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from nbd_plugin import trust
from nbd_plugin.errors import ImageError


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
                os.write(fd, blob)
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


#: the most read_own_file reads: a journal of a file in a million extents is ~40 MiB
MAX_OWN_FILE = 64 << 20


def read_own_file(path: str, what: str, limit: int = MAX_OWN_FILE) -> bytes | None:
    """The bytes of `path` if it is a regular file of root or this user that no one else may
    write (nbd_plugin.trust, in a directory others may share); None if it does not exist;
    ImageError (naming `what`) for a link, a foreign file or one larger than `limit` bytes
    (checked before reading, and the read stops there too)."""
    try:
        return trust.read_file(Path(path), what, limit, shared_dir=True)
    except FileNotFoundError:
        return None
    except (trust.Untrusted, OSError) as e:
        why = f"{what} {path}: {e.strerror or e}" if isinstance(e, OSError) else str(e)
        raise ImageError(
            f"{why}: it may be forged or not one of ours; inspect it and remove it to start over"
        ) from None
