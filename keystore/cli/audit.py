"""`vmshield audit`: read and verify the hash-chained audit trail."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import textwrap
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

#: the narrowest detail column; a narrower terminal gets each detail under its row
MIN_DETAIL = 24
#: how far a detail under its row is indented
DETAIL_INDENT = 4


def _width() -> int | None:
    """The width to wrap rows to: COLUMNS when set, else the terminal's when stdout is one;
    None (no wrapping) for a pipe, which grep and awk read a row per line."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdecimal() and int(columns) > 0:
        return int(columns)
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _lines(rows: list[list[str]], width: int | None, *, header: bool = True) -> list[str]:
    """The table view of `rows`, aligned. With a `width`, a detail (the last column) too long
    for the room beside the other columns is cut at spaces into continuation lines under
    itself; when that room is under MIN_DETAIL, every detail goes under its row, indented."""
    head = [h.upper() for h in HEADERS] if header else None
    cols = [*([head] if head else []), *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(HEADERS))] if cols else []
    if width is None or not cols:
        return [_join(r, widths) for r in cols]
    room = width - sum(widths[:-1]) - 2 * (len(widths) - 1)
    if room >= MIN_DETAIL:
        out = [_join(head, widths)] if head else []
        for r in rows:
            parts = textwrap.wrap(r[-1], room, break_on_hyphens=False) or [""]
            out.append(_join([*r[:-1], parts[0]], widths))
            out.extend(_join([*([""] * (len(r) - 1)), p], widths) for p in parts[1:])
        return out
    short = widths[:-1]
    out = [_join(head[:-1], short)] if head else []
    for r in rows:
        out.append(_join(r[:-1], short))
        indent = " " * DETAIL_INDENT
        out.extend(textwrap.wrap(r[-1], max(MIN_DETAIL, width - DETAIL_INDENT),
                                 initial_indent=indent, subsequent_indent=indent,
                                 break_on_hyphens=False))  # fmt: skip
    return out


def _join(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


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
                if not chosen.matches(e):
                    continue
                if as_json:
                    click.echo(json.dumps(e.to_json(), default=str, sort_keys=True))
                    continue
                for line in _lines([_row(e)], _width(), header=False):
                    click.echo(line)
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
    A login (auth.*) made to open a VM's disks carries that VM. On a terminal (or with
    COLUMNS set) a long detail wraps to the width; a pipe gets one line per row.

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
        for line in _lines([_row(e) for e in rows], _width()):
            click.echo(line)
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
