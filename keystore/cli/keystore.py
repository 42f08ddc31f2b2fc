"""`vmshield keystore migrate`: copy an SQLite keystore into PostgreSQL."""

from __future__ import annotations

import click

from keystore.cli.options import actor, db_option, emit_json, json_option, resolve_db
from keystore.location import Location
from keystore.postgres.migrate import migrate as migrate_keystore


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
def migrate(target: str, db: Location | None, as_json: bool) -> None:
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
    to = Location.parse(target)
    if not to.shared:
        raise click.BadParameter("expected a postgresql:// URL", param_hint="--to")
    source = resolve_db(db)
    result = migrate_keystore(source, str(to), actor=actor())
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
        click.echo(f"copied {source} to {to.display()}: {counts}")
        click.echo(
            f"audit chain verified on both sides: source head {result.source_head}, "
            f"target head {result.target.head_seq}:{result.target.head_hash}"
        )
    if not result.target.ok:
        raise click.ClickException("the copied audit chain does not verify: " +
                                   "; ".join(result.target.problems))  # fmt: skip
