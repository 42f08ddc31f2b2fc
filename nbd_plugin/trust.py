"""Whether a path is beyond the reach of other users: the one private-path check.

One set of rules for every file and directory vmshield trusts (the numba cache, hook.conf,
the host key, the run directory with its sockets, pid and log files, the jobs directory,
the erase and password-change journals):

- the entry is owned by root or by us, and nobody else may write it (a secret: nor read it);
- so is every directory above it (a sticky directory such as /tmp excepted: there only an
  entry's owner may rename or remove it);
- the last component is no symbolic link: files are opened with O_NOFOLLOW and checked on
  the descriptor (fstat), directories with lstat.

One kind of file is read from a directory others may write: an erase journal, which lives
beside its target wherever the target is (`shared_dir=True`). Only the file is checked then,
on its descriptor (another user cannot make a file that is ours), and the erase checks
what it says against the target.

A private leaf is not enough: whoever can write to a directory above it can rename the
checked entry away after the check and put their own in its place (their machine code in a
cache, their settings in a configuration). Errors are `Untrusted`, saying which entry and
why; callers add what to do.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from nbd_plugin.errors import VmshieldError

#: how a trusted file is opened: never through a link, never blocking on a FIFO
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class Untrusted(VmshieldError):
    """A path others could change (or read, for a secret); the message says which and why."""


def trusted_by_us(st: os.stat_result) -> bool:
    """Owned by root or by us, and writable by nobody else (a sticky directory such as /tmp
    excepted: there only an entry's owner may rename or remove it)."""
    others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    return st.st_uid in (0, os.geteuid()) and (not others_write or bool(sticky_dir))


def trusted_path(path: str) -> str | None:
    """``path`` resolved if it (when it exists) and every directory above it are
    ``trusted_by_us``; else None. Missing trailing components are allowed: the caller makes
    them, in a directory that has been checked."""
    real = os.path.realpath(path)
    here = real
    while True:
        try:
            if not trusted_by_us(os.stat(here)):
                return None
        except FileNotFoundError:
            pass
        except OSError:
            return None
        parent = os.path.dirname(here)
        if parent == here:
            return real
        here = parent


def problem(st: os.stat_result, *, secret: bool = False) -> str | None:
    """Why an entry with status `st` cannot be trusted itself (its directories aside), as
    words that follow its name; None if it can. Not writable by others even when sticky."""
    uid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    owner = st.st_uid in (0, uid)
    shut = (0o077 if secret else 0o022) & mode == 0
    if owner and shut:
        return None
    words = []
    if st.st_uid != uid:
        words.append(f"belongs to uid {st.st_uid}, not to you (uid {uid})")
    if not shut:
        words.append(f"is {'readable or writable' if secret else 'writable'} by others "
                     f"(mode {mode:04o})")  # fmt: skip
    return " and ".join(words)


def _check_above(path: Path, what: str) -> None:
    if trusted_path(str(path.parent)) is None:
        raise Untrusted(
            f"{what} {path}: a directory above it belongs to another user or others can write to it"
        )


def open_file(path: Path, what: str, *, secret: bool = False, shared_dir: bool = False) -> int:
    """A read-only descriptor of regular file `path` under the rules above (`what` names it
    in errors). FileNotFoundError if it is missing; Untrusted for a link, another kind of
    file, or one others could change; OSError for the rest."""
    if not shared_dir:
        _check_above(path, what)
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise Untrusted(
            f"{what} {path} cannot be opened ({e.strerror}; a symbolic link is refused)"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Untrusted(f"{what} {path} is not a regular file")
        why = problem(st, secret=secret)
        if why is not None:
            raise Untrusted(f"{what} {path} {why}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path: Path, what: str, limit: int, *, secret: bool = False,
              shared_dir: bool = False, tail: bool = False) -> bytes:  # fmt: skip
    """The bytes of trusted file `path` (see `open_file`): all of them, refused (Untrusted)
    when larger than `limit` (checked before reading, and the read stops there too); with
    `tail`, its last `limit` bytes instead."""
    fd = open_file(path, what, secret=secret, shared_dir=shared_dir)
    try:
        size = os.fstat(fd).st_size
        if tail:
            return os.pread(fd, limit, max(0, size - limit))
        too_big = Untrusted(f"{what} {path} is larger than {limit} bytes")
        if size > limit:
            raise too_big
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 16, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # it grew while we read
                raise too_big
        return b"".join(chunks)
    finally:
        os.close(fd)


def private_dir(path: Path, what: str = "directory", *, mode: int | None = 0o700) -> Path:
    """`path` as a directory under the rules above, made (with `mode`, its parents too) if
    missing and `mode` is given; Untrusted for a link, a non-directory, or one others could
    change."""
    _check_above(path, what)
    if mode is not None:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=mode, parents=True)
        _check_above(path, what)  # again: the directories made just now
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise Untrusted(f"{what} {path} is not a directory (a symlink?)")
    why = problem(st)
    if why is not None:
        raise Untrusted(f"{what} {path} {why}")
    return path
