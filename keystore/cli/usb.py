"""`vmshield usb ...`: the per-VM USB whitelist (thesis table 5-3, extended).

`vmshield usb qemu-filter VM` uses the usbgate developer's `usbgate.qemu_filter` and is
offered when that module is installed (see the bottom of this module).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from keystore.cli.options import actor, db_option, emit_json, json_option, run, table
from keystore.models import UsbAction
from keystore.sqlite import usbrules
from keystore.sqlite.usbrules import UsbRule

P = TypeVar("P")


@click.group()
def usb() -> None:
    """Manage which USB devices may reach a VM.

    Rules are tried in order and the first match decides: `allow` forwards the device,
    `block` refuses it (the owner may offer it again), `reject` refuses it and tells the
    owner to stop offering it. A device that matches no rule is blocked. Running usbgate
    processes pick up changes within 50 ms and detach devices no longer allowed.

    \b
    Examples:
      vmshield usb allow web1 0781:5567 --interface 08:06:50
      vmshield usb block web1 '*:*' --class 03 --position 1
      vmshield usb list web1
    """


def _parse(value: str, parser: Callable[[str], P], param: str) -> P:
    try:
        return parser(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=param) from e


def _make(action: UsbAction) -> click.Command:
    @click.command(action.value)
    @click.argument("vm")
    @click.argument("ids", metavar="VID:PID")
    @click.option(
        "--class",
        "device_class",
        metavar="CC",
        help="Also require this device class (bDeviceClass, hex byte).",
    )
    @click.option(
        "--interface",
        "interfaces",
        multiple=True,
        metavar="CC:SS:PP",
        help="Interface pattern (class:subclass:protocol, hex, '*' wildcards); "
        "repeatable. Every interface of the device must match one pattern.",
    )
    @click.option("--serial", help="Also require this serial number (exact).")
    @click.option(
        "--position",
        type=click.IntRange(min=1),
        help="Insert at this 1-based position (default: last).",
    )
    @json_option
    @db_option
    def cmd(
        vm: str,
        ids: str,
        device_class: str | None,
        interfaces: tuple[str, ...],
        serial: str | None,
        position: int | None,
        as_json: bool,
        db: Path | None,
    ) -> None:
        vid, pid = _parse(ids, usbrules.parse_id_pair, "VID:PID")
        dclass = (
            None if device_class is None else _parse(device_class, usbrules.parse_class, "--class")
        )
        pats = [_parse(i, usbrules.parse_pattern, "--interface") for i in interfaces]
        rule = run(
            db,
            lambda r: r.add_usb_rule(
                vm,
                action,
                vid,
                pid,
                actor=actor(),
                device_class=dclass,
                interfaces=pats or None,
                serial=serial,
                position=position,
            ),
        )
        if as_json:
            emit_json(rule.to_json())
        else:
            click.echo(f"{vm} rule {rule.position}: {rule.describe()}")

    verb = {
        UsbAction.ALLOW: "Forward",
        UsbAction.BLOCK: "Refuse",
        UsbAction.REJECT: "Refuse and reject",
    }[action]
    cmd.help = (
        f"{verb} devices matching VID:PID to VM (a `{action.value}` rule).\n\n"
        "VID:PID are 4-digit hex ids, '*' matches any (e.g. 0781:5567, 0781:*, '*:*'). "
        "The optional --class, --interface and --serial narrow the match."
    )
    return cmd


for _action in UsbAction:
    usb.add_command(_make(_action))


def _rows(rules: list[UsbRule]) -> list[list[str]]:
    return [
        [
            str(r.position),
            r.action.value,
            usbrules.format_id(r.vendor_id) + ":" + usbrules.format_id(r.product_id),
            "-" if r.device_class is None else f"{r.device_class:02x}",
            "-"
            if r.interfaces is None
            else ",".join(usbrules.format_pattern(p) for p in r.interfaces),
            "-" if r.serial is None else r.serial,
        ]
        for r in rules
    ]


@usb.command("list")
@click.argument("vm")
@json_option
@db_option
def list_(vm: str, as_json: bool, db: Path | None) -> None:
    """List the rules of VM in the order they are tried."""
    rules = run(db, lambda r: r.list_usb_rules(vm))
    if as_json:
        emit_json([r.to_json() for r in rules])
        return
    table(_rows(rules), ["#", "action", "vid:pid", "class", "interfaces", "serial"])


@usb.command("remove")
@click.argument("vm")
@click.argument("position", type=click.IntRange(min=1))
@db_option
def remove(vm: str, position: int, db: Path | None) -> None:
    """Remove rule number POSITION (see `vmshield usb list VM`); later rules move up."""
    rule = run(db, lambda r: r.remove_usb_rule(vm, position, actor=actor()))
    click.echo(f"{vm}: removed rule {position}: {rule.describe()}")


@click.command("qemu-filter")
@click.argument("vm")
@click.option(
    "--chardev",
    default="usbredir0",
    show_default=True,
    help="Chardev id to name in the printed -device argument.",
)
@json_option
@db_option
def qemu_filter(vm: str, chardev: str, as_json: bool, db: Path | None) -> None:
    """Print QEMU's usb-redir `filter=` and libvirt's `<redirfilter>` for VM's rules.

    A second line of defence generated from the same whitelist: QEMU's own filter refuses
    what it refuses even if the gateway were bypassed. It knows only class, VID and PID and
    is fixed when QEMU starts, so rules with class/interface/serial are broadened (allow)
    or left out (block/reject): it never refuses what the gateway would forward. Regenerate
    it after changing rules; the gateway applies changes live.
    """
    from usbgate import qemu_filter as qf

    rules = run(db, lambda r: r.list_usb_rules(vm))
    value = qf.qemu_filter_value(rules)
    device = f"-device usb-redir,chardev={chardev},filter={value}"
    xml = qf.libvirt_redirfilter(rules)
    notes = qf.translation_notes(rules)
    if as_json:
        emit_json(
            {"vm": vm, "filter": value, "qemu_device": device, "libvirt_xml": xml, "notes": notes}
        )
        return
    click.echo(f"QEMU:\n  '{device}'\n\nlibvirt <devices> entry:\n{xml}")
    for note in notes:
        click.echo(f"note: {note}", err=True)


def _add_qemu_filter() -> None:
    """`vmshield usb qemu-filter` needs usbgate.qemu_filter (usbgate developer)."""
    if importlib.util.find_spec("usbgate.qemu_filter") is not None:
        usb.add_command(qemu_filter)


_add_qemu_filter()
