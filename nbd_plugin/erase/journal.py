"""The erase journal: where an interrupted erase stands, so the same command can continue.

A small JSON file beside the target (`TARGET.vmshield-erase`; for a block device under
/var/lib/vmshield/erase/). It is replaced atomically (write, fsync, rename, fsync the
directory; see safefile.py: planted links are never followed) and only after the target itself
was fdatasync'ed up to the recorded position, so after a crash the journal never claims more
than the medium holds. A journal that is a link, or that another user could have written, is
refused; what a journal claims is checked against the medium before a resumed erase
certifies anything (engine.py). Redoing the bytes between
the last checkpoint and the crash is harmless: every pass writes the same bytes at the same
offsets (see keystream.py).

It holds the per-erase keystream key: that key predicts the overwrite pattern and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from nbd_plugin.erase.safefile import read_own_file
from nbd_plugin.errors import ImageError
from nbd_plugin.osutil.files import replace_file

VERSION = 1
DEVICE_JOURNAL_DIR = "/var/lib/vmshield/erase"


class Phase:
    """Steps in their order; the journal records the one in progress."""

    CRYPTO = "crypto"
    OVERWRITE = "overwrite"
    VERIFY = "verify"
    DISCARD = "discard"
    UNLINK = "unlink"
    ORDER = (CRYPTO, OVERWRITE, VERIFY, DISCARD, UNLINK)


@dataclass
class JournalState:
    """Everything a resumed erase needs; serialised as JSON."""

    target: str
    identity: list[int]
    """[st_dev, st_ino, size] of the target when the erase started: a resume must match it."""
    method: str
    key: str
    """Hex keystream key of this erase."""
    extents: list[list[int]]
    """[offset, length, shared] of every allocated extent, fixed at the start."""
    key_regions: list[list[int]]
    luks_version: int | None
    started: float
    phase: str = Phase.CRYPTO
    pass_index: int = 0
    done: int = 0
    """Bytes of the current pass (linear over `extents`) known to be on the medium."""
    bytes_written: int = 0
    passes: list[dict[str, Any]] = field(default_factory=list)
    crypto: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    discard: dict[str, Any] | None = None
    resumed: int = 0
    storage: dict[str, Any] | None = None
    """The storage assessment, made while the target still existed."""
    links: int = 1
    """Hard links of the file when the erase started (1 unless --force took more)."""
    unlink: dict[str, Any] | None = None
    """Whether the name was removed, and why not."""
    version: int = VERSION

    @property
    def erase_key(self) -> bytes:
        """The keystream key as bytes."""
        return bytes.fromhex(self.key)


def journal_path(target: str, *, block_device: bool) -> str:
    """Where the journal of `target` lives."""
    if block_device:
        name = os.path.realpath(target).strip("/").replace("/", "_")
        return os.path.join(DEVICE_JOURNAL_DIR, name + ".vmshield-erase")
    return target + ".vmshield-erase"


def load(path: str) -> JournalState | None:
    """The journal at `path`, None if there is none; ImageError if it is unreadable."""
    blob = read_own_file(path, "erase journal")
    if blob is None:
        return None
    try:
        data = json.loads(blob)
    except (RecursionError, ValueError) as e:
        raise ImageError(
            f"erase journal {path} is unreadable ({e}); remove it to start the erase over"
        ) from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ImageError(f"erase journal {path} has an unknown format; remove it to start over")
    try:
        state = JournalState(**data)
    except TypeError as e:
        raise ImageError(
            f"erase journal {path} is malformed ({e}); remove it to start over"
        ) from None
    problem = _shape_problem(state)
    if problem:
        raise ImageError(f"erase journal {path} is malformed ({problem}); remove it to start over")
    return state


def _ints(value: object, width: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == width
        and all(type(v) is int and v >= 0 for v in value)
    )


def _shape_problem(s: JournalState) -> str | None:
    """What in a parsed journal has the wrong type or range, None if nothing."""
    if not _ints(s.identity, 3):
        return "identity"
    if not isinstance(s.extents, list) or not all(_ints(e, 3) for e in s.extents):
        return "extents"
    if not isinstance(s.key_regions, list) or not all(_ints(r, 2) for r in s.key_regions):
        return "key_regions"
    if not isinstance(s.key, str) or len(s.key) != 64:
        return "key"
    try:
        bytes.fromhex(s.key)
    except ValueError:
        return "key"
    if s.phase not in Phase.ORDER or not isinstance(s.method, str):
        return "phase"
    if not _ints([s.pass_index, s.done, s.resumed, s.links], 4):
        return "counters"
    if not isinstance(s.passes, list) or not isinstance(s.target, str):
        return "passes"
    if not isinstance(s.started, int | float):
        return "started"
    for part in (s.crypto, s.verification, s.discard, s.storage, s.unlink):
        if part is not None and not isinstance(part, dict):
            return "record"
    return None


def save(path: str, state: JournalState) -> None:
    """Replace the journal atomically and durably."""
    blob = json.dumps(asdict(state), sort_keys=True).encode()
    replace_file(path, blob, 0o600, create_dir=0o700)


def remove(path: str) -> None:
    """Delete the journal (the erase is complete)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
