"""`vmshield user ...`: principals who own VMs and whose passwords open their disks."""

from __future__ import annotations

from pathlib import Path

import click

from keystore.cli.options import (
    SecretReader,
    actor,
    check_pbkdf2_iterations,
    db_option,
    emit_json,
    json_option,
    kdf_options,
    password_file_option,
    run,
    table,
    when,
    wipe,
)
from keystore.cli.progress import progress_option, reporter
from keystore.location import Location
from keystore.models import Principal
from keystore.services.passwd import Kdf, change_password
from keystore.services.store import Keystore


@click.group()
def user() -> None:
    """Manage users (principals).

    A user's password is verified by the keystore (argon2id, RFC 9106 parameters) and is
    also the passphrase of that user's LUKS keyslot on every disk they own: the keystore
    checks, rate-limits (5 failures lock the account for 15 minutes) and audits; only the
    keyslot decrypts. Forgetting the password therefore loses the disks, unless another
    keyslot was added with `vmshield image add-key`.
    """


@click.command("add")
@click.argument("name")
@password_file_option
@db_option
def add(name: str, password_file: Path | None, db: Location | None) -> None:
    """Create user NAME; asks for the password twice (hidden).

    For scripts: `--password-file FILE` or the password on stdin. At least 8 characters.
    """
    pw = SecretReader(password_file).read_new(f"Password for {name}")
    try:
        run(db, lambda r: r.add_principal(name, bytes(pw), actor=actor()))
    finally:
        wipe(pw)
    click.echo(f"user {name} created")


@click.command("passwd")
@click.argument("name")
@password_file_option
@click.option(
    "--new-password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the new password from FILE. On stdin, the new password is the second line.",
)
@kdf_options
@progress_option
@db_option
def passwd(
    name: str,
    password_file: Path | None,
    new_password_file: Path | None,
    iter_time_ms: int,
    iterations: int | None,
    progress: bool | None,
    db: Location | None,
) -> None:
    """Change NAME's password, and the keyslot passphrase on every disk NAME owns.

    Asks for the current password (it is verified and counts toward the lockout), then the
    new one twice. Each disk's keyslot is moved from the old to the new passphrase, one
    disk at a time and each step audited; the keystore's verifier changes last. All or
    none: if a disk cannot be changed (served read-write, missing) it is named and the
    disks already moved are moved back. Ctrl-C (or SIGTERM) is acted on between disks:
    the moved disks are moved back and it exits 130. After a crash or SIGKILL, its journal
    (next to the keystore, in passwd/) lets the same command, run again with the same new
    password, complete the change.
    """
    check_pbkdf2_iterations(iterations)
    src = SecretReader(password_file)
    old = src.read(f"Current password for {name}")
    new = bytearray()
    try:
        run(db, lambda r: r.authenticate(name, bytes(old), actor=actor()))
        new = src.read_new(f"New password for {name}", file=new_password_file)
        count = change_password(
            Keystore(db),
            name,
            bytes(old),
            bytes(new),
            kdf=Kdf(iterations, iter_time_ms),
            who=actor(),
            report=lambda line: click.echo(line, err=True),
            progress=reporter(progress),
        )
    finally:
        wipe(old)
        wipe(new)
    click.echo(f"password of {name} changed ({count} disk(s) re-keyed)")


@click.command("unlock")
@click.argument("name")
@db_option
def unlock(name: str, db: Location | None) -> None:
    """Clear NAME's failed-attempt counter and lockout (an administrator's decision)."""
    run(db, lambda r: r.unlock_principal(name, actor=actor()))
    click.echo(f"user {name} unlocked")


@click.command("remove")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@db_option
def remove(name: str, yes: bool, db: Location | None) -> None:
    """Remove user NAME and their password verifier.

    Refused while NAME owns a VM (each is named): the VM's disks open with NAME's password,
    so remove the VMs first (`vmshield vm remove`, after destroying or forgetting their
    disks). The audit trail keeps NAME's history.
    """
    if not yes:
        click.confirm(f"Remove user {name}?", abort=True, err=True)
    p = run(db, lambda r: r.remove_principal(name, actor=actor()))
    click.echo(f"user {p.name} removed")


def _row(p: Principal) -> list[str]:
    return [
        p.name,
        str(p.failed_attempts),
        when(p.locked_until),
        when(p.created),
        when(p.last_login),
    ]


@click.command("list")
@json_option
@db_option
def list_(as_json: bool, db: Location | None) -> None:
    """List users with their failed-attempt counters and lockouts (never the verifiers)."""
    users = run(db, lambda r: r.list_principals())
    if as_json:
        emit_json([p.to_json() for p in users])
        return
    table([_row(p) for p in users], ["name", "failures", "locked until", "created", "last login"])
