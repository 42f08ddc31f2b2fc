"""`vmshield disk bind|unbind`: network-bound unlock (a keyslot a Tang server vouches for).

The workflow is keystore.services.binding; see docs/libvirt.md for what each way of
starting unattended protects against.
"""

from __future__ import annotations

from pathlib import Path

import click

from keystore.cli.options import (
    SecretReader,
    actor,
    db_option,
    emit_json,
    handle_errors,
    json_option,
    password_file_option,
    run,
    wipe,
)
from keystore.models import Disk, DiskState
from keystore.services import binding


def _ready(db: Path | None, disk_name: str) -> Disk:
    d = run(db, lambda r: r.get_disk(disk_name))
    if d.state is not DiskState.READY:
        raise click.ClickException(f"disk {d.name} is {d.state.value}, not ready")
    return d


@click.command("bind")
@click.argument("disk_name", metavar="DISK")
@click.argument("pin", type=click.Choice(["tang"]))
@click.option("--url", required=True, help="The Tang server, e.g. http://tang.example:7500.")
@click.option(
    "--thumbprint",
    help="Trust only the Tang signing key with this thumbprint (`tang-show-keys` on the "
    "server). Without it the server's keys are trusted as they are now, and printed.",
)
@password_file_option
@json_option
@db_option
@handle_errors
def bind(
    disk_name: str,
    pin: str,
    url: str,
    thumbprint: str | None,
    password_file: Path | None,
    as_json: bool,
    db: Path | None,
) -> None:
    """Let DISK open unattended while the Tang server at URL answers (network-bound unlock).

    Asks for the owner's password once and adds a keyslot with a random passphrase that
    only the Tang server can recover (a clevis token in the LUKS2 header, as `clevis luks
    bind` writes: `clevis luks list -d IMAGE` shows it). `disk serve --unattended` and the
    libvirt hook use it; off that network the disk needs its owner again. Undo with
    `vmshield disk unbind DISK --slot N`.
    """
    d = _ready(db, disk_name)
    v = run(db, lambda r: r.get_vm(d.vm))
    config = binding.tang_config(url, thumbprint)
    pw = SecretReader(password_file).read(f"Password of {v.owner} (opens {d.name})")
    try:
        run(db, lambda r: r.authenticate(v.owner, bytes(pw), actor=actor()))
        bound = binding.bind(d.path, bytes(pw), pin, config)
    finally:
        wipe(pw)
    detail = {"disk": d.name, "keyslot": bound.keyslot, "pins": bound.pins,
              "thumbprints": list(bound.thumbprints)}  # fmt: skip
    run(db, lambda r: r.append_audit(actor(), "disk.bind", d.vm, detail))
    if as_json:
        emit_json(detail)
        return
    click.echo(f"disk {d.name}: keyslot {bound.keyslot} bound to {bound.pins}")
    for thp in bound.thumbprints:
        click.echo(f"  trusted Tang signing key {thp}")


@click.command("rebind")
@click.argument("disk_name", metavar="DISK")
@click.option("--slot", type=click.IntRange(0, 31), required=True, help="The bound keyslot.")
@click.option("--thumbprint", help="Trust only the Tang signing key with this thumbprint.")
@db_option
@handle_errors
def rebind(disk_name: str, slot: int, thumbprint: str | None, db: Path | None) -> None:
    """Bind DISK's keyslot SLOT to its Tang server's current keys (after a key rotation).

    Like `clevis luks regen`: the passphrase is recovered with the old binding (the server
    keeps rotated keys until they are deleted) and encrypted to the keys the server now
    advertises; the keyslot stays. Run it for each bound disk before deleting the old keys.
    """
    d = _ready(db, disk_name)
    bound = binding.rebind(d.path, slot, thumbprint)
    detail = {"disk": d.name, "keyslot": slot, "pins": bound.pins,
              "thumbprints": list(bound.thumbprints)}  # fmt: skip
    run(db, lambda r: r.append_audit(actor(), "disk.rebind", d.vm, detail))
    click.echo(f"disk {d.name}: keyslot {slot} rebound to {bound.pins}")
    for thp in bound.thumbprints:
        click.echo(f"  trusted Tang signing key {thp}")


@click.command("unbind")
@click.argument("disk_name", metavar="DISK")
@click.option("--slot", type=click.IntRange(0, 31), required=True, help="The bound keyslot.")
@password_file_option
@db_option
@handle_errors
def unbind(disk_name: str, slot: int, password_file: Path | None, db: Path | None) -> None:
    """Remove DISK's clevis-bound keyslot SLOT and its token (the owner's password stays)."""
    d = _ready(db, disk_name)
    v = run(db, lambda r: r.get_vm(d.vm))
    pw = SecretReader(password_file).read(f"Password of {v.owner} (opens {d.name})")
    try:
        run(db, lambda r: r.authenticate(v.owner, bytes(pw), actor=actor()))
        pins = binding.unbind(d.path, bytes(pw), slot)
    finally:
        wipe(pw)
    detail = {"disk": d.name, "keyslot": slot, "pins": pins}
    run(db, lambda r: r.append_audit(actor(), "disk.unbind", d.vm, detail))
    click.echo(f"disk {d.name}: keyslot {slot} ({pins}) removed")
