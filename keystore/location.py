"""Where a keystore is: `Location.parse("--db value")` -> an SQLite file or a PostgreSQL URL.

One type for every `--db` / VMSHIELD_DB / hook.conf `db =` value. Callers ask the location
what they need (its local file, whether several hosts share it, a display form without a
password) instead of testing which backend it names; keystore.storage opens it.
Importing this module loads no database driver.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import re
import urllib.parse
from pathlib import Path
from typing import ClassVar

from keystore.errors import NeedsLocalKeystore

_SCHEMES = ("postgresql://", "postgres://")


class Location(abc.ABC):
    """A keystore's address. `str()` gives it as it was written (for argv and hook.conf),
    `display()` as it may be shown (never a password)."""

    #: the storage backend that serves it: "sqlite" or "postgresql"
    kind: ClassVar[str]
    #: several hosts share it (cluster-wide disk leases, change notifications)
    shared: ClassVar[bool]

    @staticmethod
    def parse(value: str | os.PathLike[str] | Location) -> Location:
        """A postgresql:// (or postgres://) URL, else a path to an SQLite file."""
        if isinstance(value, Location):
            return value
        if isinstance(value, str) and value.startswith(_SCHEMES):
            return PostgresLocation(value)
        return SqliteLocation(Path(value))

    @property
    @abc.abstractmethod
    def file(self) -> Path | None:
        """The local keystore file, or None for a database server."""

    @abc.abstractmethod
    def display(self) -> str:
        """The location for messages and logs."""

    @abc.abstractmethod
    def absolute(self) -> Location:
        """The same location, independent of the current directory."""

    @abc.abstractmethod
    def check_no_password(self) -> None:
        """ValueError if the location carries a password (it would sit in argv, the
        environment or a world-readable file)."""

    def require_file(self) -> Path:
        """The local keystore file; NeedsLocalKeystore (a usage error) naming the location if
        it has none."""
        if self.file is None:
            raise NeedsLocalKeystore(f"this needs a local keystore file, not {self.display()}")
        return self.file


@dataclasses.dataclass(frozen=True)
class SqliteLocation(Location):
    """An SQLite keystore file (the embedded default)."""

    path: Path
    kind: ClassVar[str] = "sqlite"
    shared: ClassVar[bool] = False

    @property
    def file(self) -> Path:
        return self.path

    def display(self) -> str:
        return str(self.path)

    def absolute(self) -> SqliteLocation:
        return SqliteLocation(self.path.absolute())

    def check_no_password(self) -> None:
        return None

    def __str__(self) -> str:
        return str(self.path)


@dataclasses.dataclass(frozen=True)
class PostgresLocation(Location):
    """A libpq connection URL (`postgresql://USER@HOST/DB?host=/run/...`)."""

    url: str
    kind: ClassVar[str] = "postgresql"
    shared: ClassVar[bool] = True

    @property
    def file(self) -> None:
        return None

    def display(self) -> str:
        return redact(self.url)

    def absolute(self) -> PostgresLocation:
        return self

    def check_no_password(self) -> None:
        refuse_password(self.url)

    def __str__(self) -> str:
        return self.url


def redact(url: str) -> str:
    """The URL with any password replaced by `***`."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        cred, host = netloc.rsplit("@", 1)
        if ":" in cred:
            netloc = f"{cred.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def refuse_password(url: str) -> None:
    """A password in the URL would sit in argv or the environment: use ~/.pgpass instead."""
    parts = urllib.parse.urlsplit(url)
    cred = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    if ":" in cred or re.search(r"(?i)(^|&)password=", parts.query):
        raise ValueError(
            f"{redact(url)}: do not put the database password in the URL (it would be visible "
            "in argv or the environment); use ~/.pgpass, PGPASSFILE, or peer/cert authentication"
        )


__all__ = ["Location", "PostgresLocation", "SqliteLocation", "redact", "refuse_password"]
