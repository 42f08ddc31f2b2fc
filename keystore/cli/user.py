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
    fail,
    json_option,
    kdf_options,
    password_file_option,
    run,
    table,
    when,
    wipe,
)
from keystore.models import Disk, DiskState, Principal
from keystore.repository import Repository
from keystore.services import disks as diskops
from keystore.services import verifier
from keystore.services.store import Keystore
from nbd_plugin.errors import VmshieldError


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
def add(name: str, password_file: Path | None, db: Path | None) -> None:
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
@db_option
def passwd(
    name: str,
    password_file: Path | None,
    new_password_file: Path | None,
    iter_time_ms: int,
    iterations: int | None,
    db: Path | None,
) -> None:
    """Change NAME's password, and the keyslot passphrase on every disk NAME owns.

    Asks for the current password (it is verified and counts toward the lockout), then the
    new one twice. Each disk's keyslot is changed from the old to the new passphrase; a
    disk that cannot be changed (being served read-write, missing) is reported and keeps
    the old passphrase, and the verifier is only changed when every disk was re-keyed.
    """
    check_pbkdf2_iterations(iterations)
    src = SecretReader(password_file)
    old = src.read(f"Current password for {name}")
    new = bytearray()
    try:
        run(db, lambda r: r.authenticate(name, bytes(old), actor=actor()))
        new = src.read_new(f"New password for {name}", file=new_password_file)
        disks = run(db, lambda r: _owned_disks(r, name))
        failures = diskops.rekey(
            disks, bytes(old), bytes(new), iterations=iterations, iter_time_ms=iter_time_ms
        )
        if failures:
            for disk, why in failures:
                click.echo(f"disk {disk}: not re-keyed: {why}", err=True)
            raise click.ClickException(
                "password not changed: fix the disks above and run `vmshield user passwd` again"
            )
        # the verifier is made at least as costly as every re-keyed keyslot (issue 20 B5)
        policy = verifier.covering_policy(d.path for d in disks if d.state is DiskState.READY)
        try:
            Keystore(db).run(
                lambda r: r.set_password(name, bytes(new), actor=actor()), policy=policy
            )
        except (VmshieldError, ValueError) as e:
            raise fail(e) from e
    finally:
        wipe(old)
        wipe(new)
    click.echo(f"password of {name} changed")


async def _owned_disks(r: Repository, owner: str) -> list[Disk]:
    return [d for v in await r.list_vms(owner) for d in await r.list_disks(v.name)]


@click.command("unlock")
@click.argument("name")
@db_option
def unlock(name: str, db: Path | None) -> None:
    """Clear NAME's failed-attempt counter and lockout (an administrator's decision)."""
    run(db, lambda r: r.unlock_principal(name, actor=actor()))
    click.echo(f"user {name} unlocked")


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
def list_(as_json: bool, db: Path | None) -> None:
    """List users with their failed-attempt counters and lockouts (never the verifiers)."""
    users = run(db, lambda r: r.list_principals())
    if as_json:
        emit_json([p.to_json() for p in users])
        return
    table([_row(p) for p in users], ["name", "failures", "locked until", "created", "last login"])
