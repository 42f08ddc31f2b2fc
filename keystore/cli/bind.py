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
from keystore.location import Location
from keystore.models import Disk, DiskState
from keystore.services import binding


def _ready(db: Location | None, disk_name: str) -> Disk:
    d = run(db, lambda r: r.get_disk(disk_name))
    if d.state is not DiskState.READY:
        raise click.ClickException(f"disk {d.name} is {d.state.value}, not ready")
    return d


@click.command("bind")
@click.argument("disk_name", metavar="DISK")
@click.argument("pin", type=click.Choice(["tang", "tpm2", "sss"]))
@click.option(
    "--url",
    "urls",
    multiple=True,
    help="A Tang server, e.g. http://tang.example:7500 (tang: one; sss: one per server).",
)
@click.option(
    "--thumbprint",
    help="tang: trust only the signing key with this thumbprint (`tang-show-keys` on the "
    "server). Without it the server's keys are trusted as they are now, and printed.",
)
@click.option("--pcr-ids", help="tpm2: seal to these PCRs too, e.g. 7 or 0,7.")
@click.option(
    "--threshold", type=click.IntRange(1, 16), help="sss: how many of the pins must answer."
)
@click.option("--tpm2", "with_tpm2", is_flag=True, help="sss: this host's TPM2 is one pin.")
@password_file_option
@json_option
@db_option
@handle_errors
def bind(
    disk_name: str,
    pin: str,
    urls: tuple[str, ...],
    thumbprint: str | None,
    pcr_ids: str | None,
    threshold: int | None,
    with_tpm2: bool,
    password_file: Path | None,
    as_json: bool,
    db: Location | None,
) -> None:
    """Let DISK open unattended while its pins answer (network-bound unlock).

    PIN is tang (a Tang server: the disk opens only on the network that reaches it), tpm2
    (this host's TPM: the image opens on this machine only) or sss (THRESHOLD of several
    Tang servers and/or the TPM, e.g. 1 of 2 Tang servers so one down is no outage).

    Asks for the owner's password once and adds a keyslot with a random passphrase that only
    the pins can recover (a clevis token in the LUKS2 header, as `clevis luks bind` writes:
    `clevis luks list -d IMAGE` shows it). `disk serve --unattended` and the libvirt hook use
    it. Undo with `vmshield disk unbind DISK --slot N`.

    \b
      vmshield disk bind web-0 tang --url http://tang.example:7500
      vmshield disk bind web-0 tpm2 --pcr-ids 7
      vmshield disk bind web-0 sss --threshold 1 --url http://t1:7500 --url http://t2:7500
    """
    d = _ready(db, disk_name)
    v = run(db, lambda r: r.get_vm(d.vm))
    config = binding.pin_config(
        pin, urls, thumbprint=thumbprint, pcr_ids=pcr_ids, threshold=threshold, tpm2=with_tpm2
    )
    pw = SecretReader(password_file).read(f"Password of {v.owner} (opens {d.name})")
    try:
        run(db, lambda r: r.authenticate(v.owner, bytes(pw), actor=actor(), vm=v.name))
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
def rebind(disk_name: str, slot: int, thumbprint: str | None, db: Location | None) -> None:
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
def unbind(disk_name: str, slot: int, password_file: Path | None, db: Location | None) -> None:
    """Remove DISK's clevis-bound keyslot SLOT and its token (the owner's password stays)."""
    d = _ready(db, disk_name)
    v = run(db, lambda r: r.get_vm(d.vm))
    pw = SecretReader(password_file).read(f"Password of {v.owner} (opens {d.name})")
    try:
        run(db, lambda r: r.authenticate(v.owner, bytes(pw), actor=actor(), vm=v.name))
        pins = binding.unbind(d.path, bytes(pw), slot)
    finally:
        wipe(pw)
    detail = {"disk": d.name, "keyslot": slot, "pins": pins}
    run(db, lambda r: r.append_audit(actor(), "disk.unbind", d.vm, detail))
    click.echo(f"disk {d.name}: keyslot {slot} ({pins}) removed")
