"""The SQLite schema: keystore.storage.schema's steps, plus what is SQLite's alone.

`PRAGMA user_version` is the version (keystore.sqlite.connection.migrate). Booleans are 0/1,
times UTC ISO 8601 text, as in every backend.
"""

from __future__ import annotations

from keystore.storage.dialect import SQLITE
from keystore.storage.schema import migrations

# append-only audit: SQLite's triggers (PostgreSQL's are functions: keystore/postgres/schema.py)
_APPEND_ONLY = """
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
"""

#: MIGRATIONS[i] brings the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = migrations(SQLITE, {"base": _APPEND_ONLY})

SCHEMA_VERSION = len(MIGRATIONS)
