"""`vmshield perm ...`: erase permissions per VM (thesis table 5-2)."""

from __future__ import annotations

import click

from keystore.cli.options import actor, db_option, emit_json, json_option, run
from keystore.location import Location
from keystore.models import ErasePermission

YES_NO = click.Choice(["yes", "no"])


@click.group()
def perm() -> None:
    """Manage what may happen to a VM's disks when they are destroyed.

    deep erase: the disk may be destroyed by crypto-erase (keyslots wiped) followed by
    overwriting. normal delete: the disk may simply be removed, leaving ciphertext on the
    storage. New VMs allow deep erase and refuse normal delete.
    """


def _print(p: ErasePermission, as_json: bool) -> None:
    if as_json:
        emit_json(p.to_json())
        return
    click.echo(
        f"{p.vm}: deep erase {'yes' if p.deep_erase else 'no'}, "
        f"normal delete {'yes' if p.normal_delete else 'no'}"
    )


@click.command("set")
@click.argument("vm")
@click.option("--deep-erase", type=YES_NO, help="Allow destroying by crypto-erase + overwrite.")
@click.option("--normal-delete", type=YES_NO, help="Allow removing without overwriting.")
@json_option
@db_option
def set_(
    vm: str, deep_erase: str | None, normal_delete: str | None, as_json: bool, db: Location | None
) -> None:
    """Set the erase permissions of VM; an option left out keeps its value."""
    if deep_erase is None and normal_delete is None:
        raise click.UsageError("give --deep-erase yes|no and/or --normal-delete yes|no")
    p = run(
        db,
        lambda r: r.set_erase_permission(
            vm,
            actor=actor(),
            deep_erase=None if deep_erase is None else deep_erase == "yes",
            normal_delete=None if normal_delete is None else normal_delete == "yes",
        ),
    )
    _print(p, as_json)


@click.command("show")
@click.argument("vm")
@json_option
@db_option
def show(vm: str, as_json: bool, db: Location | None) -> None:
    """Show the erase permissions of VM."""
    _print(run(db, lambda r: r.get_erase_permission(vm)), as_json)
