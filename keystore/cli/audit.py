"""`vmshield audit`: read and verify the hash-chained audit trail."""

from __future__ import annotations

from pathlib import Path

import click

from keystore.backends import verify_audit
from keystore.cli.options import (
    db_option,
    emit_json,
    handle_errors,
    json_option,
    resolve_location,
    run,
    table,
    when,
)


@click.group(invoke_without_command=True)
@click.option("--vm", help="Only rows about this VM.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the most recent N rows.")
@json_option
@db_option
@click.pass_context
def audit(
    ctx: click.Context, vm: str | None, limit: int | None, as_json: bool, db: Path | None
) -> None:
    """Show the audit trail, oldest first; `vmshield audit verify` checks its integrity.

    Every change made through vmshield (users, VMs, disks, permissions, USB rules, logins,
    failed logins, lockouts, disk serving, erase, USB attach/detach by usbgate) appends
    one row carrying the hash of the previous row. No password or passphrase is ever
    recorded. ACTOR is who the command says it runs for ($SUDO_USER under sudo); OS USER
    is the real uid of the process that wrote the row, which the caller cannot choose.
    """
    if ctx.invoked_subcommand is not None:
        return
    rows = run(db, lambda r: r.list_audit(vm, limit))
    if as_json:
        emit_json([e.to_json() for e in rows])
        return
    table(
        [
            [
                str(e.seq),
                when(e.ts),
                e.actor,
                "-" if e.os_uid is None else f"{e.os_user or '?'}({e.os_uid})",
                e.action,
                e.vm or "-",
                " ".join(f"{k}={v}" for k, v in sorted(e.detail.items())),
            ]
            for e in rows
        ],
        ["seq", "time (utc)", "actor", "os user", "action", "vm", "detail"],
    )


@click.command("verify")
@click.option(
    "--anchor",
    metavar="SEQ:HASH",
    help="A head printed by an earlier verify, kept elsewhere: it must still be "
    "in the chain (detects a rewritten history).",
)
@json_option
@db_option
@handle_errors
def verify(anchor: str | None, as_json: bool, db: Path | None) -> None:
    """Recompute the audit hash chain; exit 1 if a row was edited, inserted or deleted.

    Prints the head (SEQ:HASH). Keep a copy outside this machine and pass it to
    `--anchor` later: someone able to write the database could otherwise rewrite the
    whole chain consistently.
    """
    result = verify_audit(resolve_location(db), anchor)
    if as_json:
        emit_json(
            {
                "ok": result.ok,
                "rows": result.rows,
                "head": f"{result.head_seq}:{result.head_hash}",
                "problems": list(result.problems),
            }
        )
    else:
        for p in result.problems:
            click.echo(f"BROKEN: {p}", err=True)
        click.echo(
            f"{'ok' if result.ok else 'FAILED'}: {result.rows} rows, "
            f"head {result.head_seq}:{result.head_hash}"
        )
    if not result.ok:
        raise SystemExit(1)
