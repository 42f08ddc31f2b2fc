"""`vmshield usb ...`: the per-VM USB whitelist (thesis table 5-3, extended).

The rules, their grammar and their meaning are usbgate.policy's; `qemu-filter` prints
usbgate.qemu_filter's translation (the same one `usbgate qemu-filter` prints).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from keystore.cli.options import actor, db_option, emit_json, json_option, run, table
from keystore.models import UsbAction
from keystore.sqlite.usbrules import UsbRule
from usbgate import policy
from usbgate import qemu_filter as qf

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
        vid, pid = _parse(ids, policy.parse_id_pair, "VID:PID")
        dclass = (
            None if device_class is None else _parse(device_class, policy.parse_class, "--class")
        )
        pats = [_parse(i, policy.parse_pattern, "--interface") for i in interfaces]
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
            policy.format_id(r.vendor_id) + ":" + policy.format_id(r.product_id),
            "-" if r.device_class is None else f"{r.device_class:02x}",
            "-"
            if r.interfaces is None
            else ",".join(policy.format_pattern(p) for p in r.interfaces),
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


@usb.command("qemu-filter")
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
    result = qf.report(vm, run(db, lambda r: r.list_usb_rules(vm)))
    if as_json:
        emit_json(result.device_json(chardev))
        return
    click.echo(result.device_text(chardev))
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
