"""`vmshield keystore migrate`, and `vmshield init` on a PostgreSQL keystore."""

from __future__ import annotations

from pathlib import Path

import click

from keystore.cli.options import actor, db_option, emit_json, json_option, resolve_db
from keystore.postgres import audit as pgaudit
from keystore.postgres import connection as pgconn
from keystore.postgres.migrate import migrate as migrate_keystore
from keystore.postgres.schema import SCHEMA_VERSION
from keystore.postgres.url import PgUrl, is_url


def init_postgres(url: PgUrl) -> None:
    """`vmshield init --db postgresql://...`: create or upgrade the schema and its roles."""
    created, old = pgconn.initialise(url)
    where = url.redacted()
    if created or old < SCHEMA_VERSION:
        conn = pgconn.connect_sync(url)
        try:
            action, detail = (
                ("keystore.init", {"schema": SCHEMA_VERSION})
                if created
                else ("keystore.upgrade", {"from": old, "to": SCHEMA_VERSION})
            )
            pgaudit.append_sync(conn, actor(), action, None, detail)
        finally:
            conn.close()
    if created:
        click.echo(f"created keystore {where} (schema version {SCHEMA_VERSION})")
    elif old < SCHEMA_VERSION:
        click.echo(f"upgraded keystore {where} from schema {old} to {SCHEMA_VERSION}")
    else:
        click.echo(f"keystore {where} is up to date (schema version {SCHEMA_VERSION})")


@click.group("keystore")
def keystore_group() -> None:
    """Operations on the keystore database as a whole."""


@keystore_group.command("migrate")
@click.option(
    "--to",
    "target",
    required=True,
    metavar="URL",
    help="The PostgreSQL database to copy into (postgresql://USER@HOST/DB): empty, or "
    "not yet initialised.",
)
@db_option
@json_option
def migrate(target: str, db: Path | None, as_json: bool) -> None:
    """Copy this host's SQLite keystore into PostgreSQL, for several hosts to share.

    Verifies the SQLite audit chain first (nothing is copied if it is broken), copies
    every user (argon2id verifiers only: no secret is in either database), VM, disk,
    permission, USB rule and audit row in one transaction, then verifies the chain in
    PostgreSQL against the SQLite head. Refuses a target that already holds a keystore,
    so it cannot run twice. The SQLite file is not changed: point --db / VMSHIELD_DB at
    the URL afterwards.

    \b
    Example:
      vmshield keystore migrate --to postgresql://vmshield@db1/vmshield
    """
    if not is_url(target):
        raise click.BadParameter("expected a postgresql:// URL", param_hint="--to")
    url = PgUrl(target)
    source = resolve_db(db)
    result = migrate_keystore(source, url, actor=actor())
    if as_json:
        emit_json(
            {
                "ok": result.target.ok,
                "rows": result.rows,
                "source_head": result.source_head,
                "target_head": f"{result.target.head_seq}:{result.target.head_hash}",
                "problems": list(result.target.problems),
            }
        )
    else:
        counts = ", ".join(f"{n} {t}" for t, n in result.rows.items())
        click.echo(f"copied {source} to {url.redacted()}: {counts}")
        click.echo(
            f"audit chain verified on both sides: source head {result.source_head}, "
            f"target head {result.target.head_seq}:{result.target.head_hash}"
        )
    if not result.target.ok:
        raise click.ClickException("the copied audit chain does not verify: " +
                                   "; ".join(result.target.problems))  # fmt: skip
