"""Whether a path is beyond the reach of other users: it and every directory above it.

A private leaf is not enough: whoever can write to a directory above it can rename the
checked entry away after the check and put their own in its place (their machine code in a
cache, their settings in a configuration).
"""

from __future__ import annotations

import os
import stat


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
