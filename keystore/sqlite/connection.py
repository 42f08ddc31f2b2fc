"""Opening the SQLite file: creation with mode 0600, pragmas, migrations, error translation.

Every connection gets WAL, a busy timeout, foreign keys and synchronous=FULL (the keystore
writes little; the audit trail should survive a power cut). Writers start with
`BEGIN IMMEDIATE` so two processes never deadlock on a read-to-write upgrade: the second
one waits up to the busy timeout, then gets `KeystoreBusy`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from keystore.errors import DatabaseUnavailable, KeystoreBusy, KeystoreError
from keystore.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from keystore.storage.schema import check_version

if TYPE_CHECKING:
    import aiosqlite  # imported by open_async alone: the blocking path never loads asyncio

#: How long a writer waits for another process's write transaction before giving up.
BUSY_TIMEOUT_MS = 5000


def _pragmas() -> tuple[str, ...]:
    return (
        f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
        "PRAGMA foreign_keys = ON",
        "PRAGMA synchronous = FULL",
    )


def _blocked_dir(path: Path) -> Path | None:
    """The first directory on the way to `path` this process may not search, if any."""
    for p in reversed(path.parents):
        if os.path.isdir(p) and not os.access(p, os.X_OK):
            return p
    return None


def diagnose(path: Path) -> str:
    """Say why `path` cannot be used as the keystore file, as precisely as we can tell."""
    parent = path.parent
    blocked = _blocked_dir(path)
    if blocked is not None:
        return f"permission denied: directory {blocked} is not searchable by uid {os.geteuid()}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        for p in parent.parents if not os.path.lexists(parent) else ():
            if os.path.lexists(p):
                if not os.path.isdir(p):
                    return f"{p} is not a directory"
                break
        if not os.path.isdir(parent):
            if os.path.lexists(parent):
                return f"{parent} is not a directory"
            return f"directory {parent} does not exist"
        return "the file does not exist (run `vmshield init`, or pass --db / VMSHIELD_DB)"
    except NotADirectoryError:
        p = next(p for p in reversed(path.parents) if os.path.lexists(p) and not os.path.isdir(p))
        return f"{p} is not a directory"
    except OSError as e:
        return os.strerror(e.errno) if e.errno else str(e)
    if stat.S_ISDIR(st.st_mode):
        return "it is a directory"
    if not os.access(path, os.R_OK):
        return "permission denied (not readable)"
    if not os.access(path, os.W_OK):
        return "permission denied (not writable)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable (SQLite needs it for the -wal file)"
    return "not a vmshield keystore, or a corrupt one"


def translate(exc: BaseException, path: Path) -> KeystoreError:
    """Map an sqlite3 / OS error to a KeystoreError whose message names `path`."""
    msg = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
        return KeystoreBusy(
            f"keystore {path} is busy: another vmshield process held the write lock for more "
            f"than {BUSY_TIMEOUT_MS / 1000:g} s; try again"
        )
    if "readonly" in msg or "read-only" in msg:
        return DatabaseUnavailable(f"cannot write keystore {path}: {diagnose(path)}")
    return DatabaseUnavailable(f"cannot use keystore {path}: {diagnose(path)} ({msg})")


def create_file(path: Path) -> bool:
    """Create an empty keystore file with mode 0600 (parents 0700). False if it existed."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    except PermissionError as e:
        where = next((p for p in path.parents if p.exists()), path.parent)
        raise DatabaseUnavailable(
            f"cannot create keystore {path}: permission denied (directory {where} is not "
            f"writable by uid {os.geteuid()})"
        ) from e
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            reason = diagnose(path)
        raise DatabaseUnavailable(f"cannot create keystore {path}: {reason}") from e
    os.close(fd)
    return True


def _uri(path: Path, mode: str) -> str:
    return f"file:{urllib.parse.quote(str(path.absolute()))}?mode={mode}"


def _split(script: str) -> Iterator[str]:
    """Split a migration script into statements (trigger bodies stay whole)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buf.strip()[:60]}")


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the schema to SCHEMA_VERSION inside one IMMEDIATE transaction; return the old one."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            check_version(version, SCHEMA_VERSION, str(path))
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise DatabaseUnavailable(f"{path} is an SQLite file but not a vmshield keystore")
        for n in range(version, SCHEMA_VERSION):
            for stmt in _split(MIGRATIONS[n]):
                try:
                    conn.execute(stmt)
                except sqlite3.OperationalError as e:
                    if "locked" in str(e) or "busy" in str(e):
                        raise
                    raise DatabaseUnavailable(
                        f"keystore {path}: migration to schema {n + 1} failed ({e}); "
                        f"nothing was changed, the keystore stays at version {version}"
                    ) from e
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version


def _configure(conn: sqlite3.Connection, *, readonly: bool) -> None:
    for p in _pragmas():
        conn.execute(p)
    if not readonly:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise DatabaseUnavailable(f"cannot switch keystore to WAL mode (got {mode})")


def open_sync(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A stdlib connection in autocommit mode with the keystore pragmas (for other processes).

    The schema must already be current; `readonly` opens with `mode=ro`.
    """
    path = Path(path)
    try:
        conn = sqlite3.connect(
            _uri(path, "ro" if readonly else "rw"),
            uri=True,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
        )
    except sqlite3.Error as e:
        raise translate(e, path) from e

    def current(conn: sqlite3.Connection) -> None:
        _configure(conn, readonly=readonly)
        check_version(conn.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION, str(path))

    return _set_up(conn, path, current)


def _set_up(
    conn: sqlite3.Connection, path: Path, step: Callable[[sqlite3.Connection], object]
) -> sqlite3.Connection:
    """`conn` once `step(conn)` ran; closed (the error translated) if it failed."""
    try:
        step(conn)
    except sqlite3.Error as e:
        conn.close()
        raise translate(e, path) from e
    except BaseException:
        conn.close()
        raise
    return conn


def initialise(path: Path) -> tuple[bool, int]:
    """Create (mode 0600) and migrate the keystore. Returns (created, previous version)."""
    path = Path(path)
    created = create_file(path)
    try:
        with contextlib.closing(
            sqlite3.connect(
                _uri(path, "rw"), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
            )
        ) as conn:
            _configure(conn, readonly=False)
            old = migrate(conn, path)
    except sqlite3.Error as e:
        raise translate(e, path) from e
    return created, old


def open_blocking(path: Path) -> sqlite3.Connection:
    """A stdlib connection (autocommit; use `BEGIN IMMEDIATE` to write) on a current schema,
    with the keystore pragmas: the repository's own (keystore.sqlite.repository), blocking.

    Raises DatabaseUnavailable naming the path if it is missing, unwritable, or not ours.
    Older schemas are migrated in place.
    """
    path = Path(path)
    try:
        usable = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        usable = False
    if not usable:
        raise DatabaseUnavailable(f"cannot use keystore {path}: {diagnose(path)}")
    try:
        conn = sqlite3.connect(
            _uri(path, "rw"), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
        )
    except sqlite3.Error as e:
        raise translate(e, path) from e

    def migrated(conn: sqlite3.Connection) -> None:
        _configure(conn, readonly=False)
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            migrate(conn, path)

    return _set_up(conn, path, migrated)


async def open_async(path: Path) -> aiosqlite.Connection:
    """An aiosqlite connection (autocommit; use `BEGIN IMMEDIATE` to write) on a current schema.

    The file is checked and migrated as `open_blocking` does.
    """
    import aiosqlite

    path = Path(path)
    open_blocking(path).close()
    try:
        db = await aiosqlite.connect(
            _uri(path, "rw"), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
        )
    except sqlite3.Error as e:
        raise translate(e, path) from e
    try:
        for p in _pragmas():
            await db.execute(p)
    except sqlite3.Error as e:
        await db.close()
        raise translate(e, path) from e
    db.row_factory = sqlite3.Row
    return db
