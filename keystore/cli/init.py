"""`vmshield init`: create or upgrade the keystore database."""

from __future__ import annotations

import click

from keystore import backends
from keystore.cli.options import actor, db_option, resolve_location
from keystore.location import Location


@click.command()
@db_option
def init(db: Location | None) -> None:
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
    location = resolve_location(db)
    done = backends.initialise(location)
    where, version = location.display(), done.version
    if done.created:
        backends.append_audit(location, actor(), "keystore.init", None, {"schema": version})
        click.echo(f"created keystore {where} (schema version {version})")
    elif done.old < version:
        detail = {"from": done.old, "to": version}
        backends.append_audit(location, actor(), "keystore.upgrade", None, detail)
        click.echo(f"upgraded keystore {where} from schema {done.old} to {version}")
    else:
        click.echo(f"keystore {where} is up to date (schema version {version})")
