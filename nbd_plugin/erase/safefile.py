"""Files erase keeps beside its target (journal, certificate), safe in a shared directory.

Another user who can write to the image's directory may plant symlinks or files at the names
erase uses. So they are written by `nbd_plugin.osutil.files.replace_file` (a new temporary
name through the directory's descriptor, renamed over the final one: never through a link),
and read by `read_own_file`, which refuses links and files another user could have written
(nbd_plugin.trust).
"""

from __future__ import annotations

from pathlib import Path

from nbd_plugin import trust
from nbd_plugin.errors import ImageError

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
