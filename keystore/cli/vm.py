"""`vmshield vm ...`: virtual machines (thesis table 5-1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from keystore.cli.options import (
    SecretReader,
    actor,
    db_option,
    emit_json,
    json_option,
    password_file_option,
    run,
    table,
    when,
    wipe,
)
from keystore.location import Location
from keystore.models import UNLOCK_POLICIES, Vm
from keystore.repository import Repository
from keystore.services import unattended, unlock
from keystore.services.store import Keystore
from keystore.sizes import human


@click.group()
def vm() -> None:
    """Manage virtual machines.

    A VM has an owner (a `vmshield user`), a uuid (generated unless given, e.g. libvirt's
    domain uuid), optional storage pool and storage domain uuids, and counts how often its
    disks were served (last access, access count).
    """


@click.command("add")
@click.argument("name")
@click.option("--owner", required=True, help="User who owns the VM (see `vmshield user add`).")
@click.option("--uuid", "vm_uuid", help="VM uuid (default: a new random one).")
@click.option("--pool-uuid", help="Storage pool uuid, recorded as-is.")
@click.option("--domain-uuid", help="Storage domain uuid, recorded as-is.")
@db_option
def add(
    name: str,
    owner: str,
    vm_uuid: str | None,
    pool_uuid: str | None,
    domain_uuid: str | None,
    db: Location | None,
) -> None:
    """Record VM NAME owned by OWNER.

    New VMs get the default erase permission: deep erase allowed, normal delete refused
    (change with `vmshield perm set`), and an empty USB whitelist (nothing is forwarded).
    """
    v = run(
        db,
        lambda r: r.add_vm(
            name, owner, actor=actor(), uuid=vm_uuid, pool_uuid=pool_uuid, domain_uuid=domain_uuid
        ),
    )
    click.echo(f"VM {v.name} created (uuid {v.uuid})")


@click.command("list")
@click.option("--owner", help="Only VMs of this user.")
@json_option
@db_option
def list_(owner: str | None, as_json: bool, db: Location | None) -> None:
    """List VMs with owner, uuid, last access and access count."""
    vms: list[Vm] = run(db, lambda r: r.list_vms(owner))
    if as_json:
        emit_json([v.to_json() for v in vms])
        return
    table(
        [[v.name, v.owner, v.uuid, when(v.last_access), str(v.access_count)] for v in vms],
        ["name", "owner", "uuid", "last access", "accesses"],
    )


async def _show(r: Repository, name: str) -> dict[str, Any]:
    v = await r.get_vm(name)
    return {
        "vm": v.to_json(),
        "disks": [d.to_json() for d in await r.list_disks(v.name)],
        "erase_permission": (await r.get_erase_permission(v.name)).to_json(),
        "usb_rules": [u.to_json() for u in await r.list_usb_rules(v.name)],
    }


@click.command("show")
@click.argument("name")
@click.option("--bytes", "raw", is_flag=True, help="Disk sizes in bytes (default: 20 GiB).")
@json_option
@db_option
def show(name: str, raw: bool, as_json: bool, db: Location | None) -> None:
    """Show VM NAME (name or uuid): its record, disks, erase permission and USB rules."""
    info = run(db, lambda r: _show(r, name))
    if as_json:
        emit_json(info)
        return
    v = info["vm"]
    for key in (
        "name",
        "uuid",
        "owner",
        "pool_uuid",
        "domain_uuid",
        "created",
        "last_access",
        "access_count",
        "unlock",
    ):
        click.echo(f"{key.replace('_', ' ') + ':':14} {v[key] if v[key] is not None else '-'}")
    p = info["erase_permission"]
    click.echo(f"{'deep erase:':14} {'yes' if p['deep_erase'] else 'no'}")
    click.echo(f"{'normal delete:':14} {'yes' if p['normal_delete'] else 'no'}")
    click.echo("disks:" + ("" if info["disks"] else " none"))
    for d in info["disks"]:
        click.echo(
            f"  {d['name']}  {d['state']}  {d['size'] if raw else human(d['size'])}"
            f"{' bytes' if raw else ''}  {d['format']} "
            f"{d['cipher']}  {d['path']}"
        )
    click.echo("usb rules:" + ("" if info["usb_rules"] else " none (nothing is forwarded)"))
    for u in info["usb_rules"]:
        click.echo(f"  {u['position']}. {u['action']} {u['vendor_id']}:{u['product_id']}")


@click.command("set")
@click.argument("name")
@click.option(
    "--unlock",
    "policy",
    type=click.Choice(UNLOCK_POLICIES),
    required=True,
    help="Which unattended ways may open the VM's disks at `disk serve --unattended` and "
    "`virsh start`: owner (only a pending `vm unlock`), network (also a clevis token: Tang "
    "or TPM, `disk bind`), host-key (also the enrolled host key), any (both; the default).",
)
@db_option
def set_(name: str, policy: str, db: Location | None) -> None:
    """Set how VM NAME's disks may open without their owner typing a password."""
    v = run(db, lambda r: r.set_unlock_policy(name, policy, actor=actor()))
    click.echo(f"VM {v.name}: unlock {v.unlock}")


@click.command("remove")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@db_option
def remove(name: str, yes: bool, db: Location | None) -> None:
    """Remove VM NAME with its permissions and USB rules.

    Refused while the VM has disks that are not destroyed: destroy them first
    (`vmshield disk destroy`) so no readable image is left without a record.
    The audit trail keeps the VM's history.
    """
    if not yes:
        click.confirm(f"Remove VM {name}?", abort=True, err=True)
    v = run(db, lambda r: r.remove_vm(name, actor=actor()))
    click.echo(f"VM {v.name} removed")


@click.command("unlock")
@click.argument("vm_name", metavar="VM")
@click.option(
    "--for",
    "duration",
    default="10m",
    show_default=True,
    metavar="DURATION",
    help="How long the unlock waits for a start: 90s, 10m, 2h (at most 24h).",
)
@click.option("--cancel", is_flag=True, help="Withdraw a pending unlock instead.")
@password_file_option
@db_option
def unlock_vm(
    vm_name: str, duration: str, cancel: bool, password_file: Path | None, db: Location | None
) -> None:  # fmt: skip
    """Let the next `virsh start VM` open its disks, within DURATION.

    Asks for the owner's password (verified and rate-limited by the keystore) and leaves
    it in root's kernel keyring with a timeout, where only root (the qemu hook under
    libvirtd) can read it. The hook takes it at the next start and removes it: one unlock,
    one start. After DURATION the kernel drops it and a start fails with "unlock VM first".
    """
    unattended.require_root(vm_name)
    store = Keystore(db)
    v = run(db, lambda r: r.get_vm(vm_name))
    if cancel:
        had = unattended.cancel_unlock(store, v, who=actor())
        click.echo(f"VM {v.name}: unlock withdrawn" if had else f"VM {v.name}: no pending unlock")
        return
    try:
        ttl = unlock.parse_duration(duration)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--for") from e
    pw = SecretReader(password_file).read(f"Password of {v.owner} (opens the disks of {v.name})")
    try:
        unattended.unlock_vm(store, v, bytes(pw), ttl, who=actor())
    finally:
        wipe(pw)
    click.echo(f"VM {v.name} unlocked for {ttl} s: `virsh start {v.name}` within that time")
