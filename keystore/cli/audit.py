"""`vmshield audit`: read and verify the hash-chained audit trail."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from datetime import datetime

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
from keystore.location import Location
from keystore.models import AuditEntry
from keystore.repository import Repository
from keystore.services import auditview
from keystore.services.auditview import AuditFilter


def _row(e: AuditEntry) -> list[str]:
    return [
        str(e.seq),
        when(e.ts),
        e.actor,
        "-" if e.os_uid is None else f"{e.os_user or '?'}({e.os_uid})",
        e.action,
        e.vm or "-",
        " ".join(f"{k}={v}" for k, v in sorted(e.detail.items())),
    ]


HEADERS = ["seq", "time (utc)", "actor", "os user", "action", "vm", "detail"]


def _time(param: str) -> Callable[[click.Context, click.Parameter, str | None], datetime | None]:
    def convert(ctx: click.Context, p: click.Parameter, value: str | None) -> datetime | None:
        if value is None:
            return None
        try:
            return auditview.parse_time(value)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=param) from None

    return convert


async def _recent(r: Repository, *, vm: str | None, n: int) -> list[AuditEntry]:
    return await r.list_audit(vm, n)


def _follow(db: Location | None, vm: str | None, chosen: AuditFilter, last: int, as_json: bool,
            interval: float) -> None:  # fmt: skip
    """Print rows appended after `last` as they come, until interrupted."""
    try:
        while True:
            time.sleep(interval)
            batch = 200
            while True:
                rows = run(db, functools.partial(_recent, vm=vm, n=batch))
                if not rows or rows[0].seq <= last + 1 or len(rows) < batch:
                    break
                batch *= 4  # more arrived than one batch: read far enough back
            for e in rows:
                if e.seq <= last:
                    continue
                last = e.seq
                if chosen.matches(e):
                    text = json.dumps(e.to_json(), default=str, sort_keys=True)
                    click.echo(text if as_json else "  ".join(_row(e)))
    except KeyboardInterrupt:
        return


@click.group(invoke_without_command=True)
@click.option("--vm", help="Only rows about this VM.")
@click.option(
    "--action",
    "actions",
    multiple=True,
    metavar="PATTERN",
    help="Only these actions: auth.fail, 'disk.*' (repeatable).",
)
@click.option(
    "--actor",
    "actors",
    multiple=True,
    metavar="PATTERN",
    help="Only rows by this actor: alice, libvirt-hook, 'root@*'.",
)
@click.option(
    "--since",
    callback=_time("--since"),
    metavar="TIME",
    help="From this time on: ISO 8601 UTC (2026-12-07T01:30) or an age (2h, 3d).",
)
@click.option(
    "--until",
    callback=_time("--until"),
    metavar="TIME",
    help="Up to this time (same forms as --since).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the most recent N matching rows.")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Then print matching rows as they are appended, until Ctrl-C "
    "(with --json: one object per line).",
)
@json_option
@db_option
@click.pass_context
def audit(
    ctx: click.Context, vm: str | None, actions: tuple[str, ...], actors: tuple[str, ...],
    since: datetime | None, until: datetime | None, limit: int | None, follow: bool,
    as_json: bool, db: Location | None,
) -> None:  # fmt: skip
    """Show the audit trail, oldest first; `vmshield audit verify` checks its integrity.

    Every change made through vmshield (users, VMs, disks, permissions, USB rules, logins,
    failed logins, lockouts, disk serving, erase, USB attach/detach by usbgate) appends
    one row carrying the hash of the previous row. No password or passphrase is ever
    recorded. ACTOR is who the command says it runs for ($SUDO_USER under sudo); OS USER
    is the real uid of the process that wrote the row, which the caller cannot choose.

    \b
    Examples:
      vmshield audit --action 'auth.*' --since 2h
      vmshield audit --vm web --actor libvirt-hook --since 2026-12-07
      vmshield audit --follow --action 'disk.*'
    """
    if ctx.invoked_subcommand is not None:
        return
    if follow and until is not None:
        raise click.UsageError("--follow shows new rows: it cannot have an --until")
    chosen = AuditFilter(actions, actors, since, until)
    every = run(db, lambda r: r.list_audit(vm, None))
    rows = chosen.select(every, limit)
    if as_json and follow:
        for e in rows:
            click.echo(json.dumps(e.to_json(), default=str, sort_keys=True))
    elif as_json:
        emit_json([e.to_json() for e in rows])
    else:
        table([_row(e) for e in rows], HEADERS)
    if follow:
        _follow(db, vm, chosen, every[-1].seq if every else 0, as_json, FOLLOW_INTERVAL)


#: how often --follow looks for new rows
FOLLOW_INTERVAL = 0.5


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
def verify(anchor: str | None, as_json: bool, db: Location | None) -> None:
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
