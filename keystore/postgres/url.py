"""Telling a PostgreSQL URL from a keystore file name, and printing one without its password."""

from __future__ import annotations

import re
import urllib.parse

_SCHEMES = ("postgresql://", "postgres://")


class PgUrl(str):
    """A libpq connection URL given as `--db` (`postgresql://USER@HOST/DB?host=/run/...`)."""

    __slots__ = ()

    def redacted(self) -> str:
        """The URL with any password replaced by `***` (for messages and logs)."""
        return redact(self)


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(_SCHEMES)


def redact(url: str) -> str:
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
