"""`vmshield init`: create or upgrade the keystore database."""

from __future__ import annotations

from pathlib import Path

import click

from keystore import audit
from keystore.cli.options import actor, db_option, resolve_db
from keystore.postgres.url import PgUrl
from keystore.sqlite import connection as dbmod
from keystore.sqlite.schema import SCHEMA_VERSION


@click.command()
@db_option
def init(db: Path | None) -> None:
    """Create the keystore database, or upgrade an existing one to this version's schema.

    The file is created with mode 0600 (its directory 0700) and uses SQLite's WAL journal.
    Running it again is harmless. With `--db postgresql://...` it creates the schema and
    the vmshield_admin / vmshield_usbgate roles in that database instead. The keystore
    holds password verifiers (argon2id), VMs, disks, erase permissions, USB whitelists and
    the audit trail; nothing in it alone decrypts a disk.

    \b
    Next steps:
      vmshield user add alice
      vmshield vm add web1 --owner alice
      vmshield disk create web1 --size 20G
      vmshield disk serve web1-0
    """
    if isinstance(db, PgUrl):
        from keystore.cli.keystore import init_postgres

        return init_postgres(db)
    path = resolve_db(db)
    created, old = dbmod.initialise(path)
    if created:
        audit.append_audit(path, actor(), "keystore.init", None, {"schema": SCHEMA_VERSION})
        click.echo(f"created keystore {path} (schema version {SCHEMA_VERSION})")
    elif old < SCHEMA_VERSION:
        audit.append_audit(
            path, actor(), "keystore.upgrade", None, {"from": old, "to": SCHEMA_VERSION}
        )
        click.echo(f"upgraded keystore {path} from schema {old} to {SCHEMA_VERSION}")
    else:
        click.echo(f"keystore {path} is up to date (schema version {SCHEMA_VERSION})")
