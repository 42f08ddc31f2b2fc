"""`vmshield usb ...`: the per-VM USB whitelist (thesis table 5-3, extended).

The rules, their grammar and their meaning are usbgate.rules.policy's; `qemu-filter` prints
usbgate.rules.qemu_filter's translation (the same one `usbgate qemu-filter` prints).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from keystore.cli.options import CliError, actor, db_option, emit_json, json_option, run, table
from keystore.location import Location
from keystore.models import UsbAction, UsbRule
from keystore.repository import Repository
from keystore.services import usb_rules
from usbgate.rules import policy

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
        help="Insert at this 1-based position (default: last, or just before an earlier rule "
        "that would otherwise decide these devices first). Refused if an earlier rule with "
        "another action would still decide them first.",
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
        db: Location | None,
    ) -> None:
        vid, pid = _parse(ids, policy.parse_id_pair, "VID:PID")
        dclass = (
            None if device_class is None else _parse(device_class, policy.parse_class, "--class")
        )
        pats = [_parse(i, policy.parse_pattern, "--interface") for i in interfaces]

        async def add(
            repo: Repository,
        ) -> tuple[UsbRule | None, policy.Placement, list[UsbRule]]:
            # placed and inserted as one step: another admin's rule cannot slip in between
            rule, where = await usb_rules.add_rule(repo, vm, action, vid, pid, actor=actor(),
                                                   device_class=dclass, interfaces=pats or None,
                                                   serial=serial, position=position)  # fmt: skip
            after = [] if rule is None else await repo.list_usb_rules(vm)
            return rule, where, after  # one keystore opening, not two

        rule, where, after = run(db, add, blocking=True)
        if as_json:
            emit_json({**(rule.to_json() if rule else {}), "added": rule is not None,
                       "note": where.note or None})  # fmt: skip
        elif rule is None:
            click.echo(f"{vm}: {where.note}")
        else:
            click.echo(f"{vm} rule {rule.position}: {rule.describe()}")
            if where.note:
                click.echo(f"note: {where.note}", err=True)
        if rule is not None and not as_json:
            _warn_newly_shadowed(after, rule)

    verb = {
        UsbAction.ALLOW: "Forward",
        UsbAction.BLOCK: "Refuse",
        UsbAction.REJECT: "Refuse and reject",
    }[action]
    cmd.help = (
        f"{verb} devices matching VID:PID to VM (a `{action.value}` rule).\n\n"
        "VID:PID are 4-digit hex ids, '*' matches any (e.g. 0781:5567, 0781:*, '*:*'). "
        "The optional --class, --interface and --serial narrow the match.\n\n"
        "The first matching rule decides, so the command makes sure the new rule takes "
        "effect: if an earlier rule with another action already matches every device it "
        "matches, the new rule goes just before that rule (and says so); if one with the "
        "same action does, nothing is added. With --position, such a rule is refused "
        "with a message naming the rule in the way."
    )
    return cmd


for _action in UsbAction:
    usb.add_command(_make(_action))


def _rows(rules: list[UsbRule]) -> list[list[str]]:
    shadows = policy.shadowed(rules)
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
            "-" if by is None else f"shadowed by #{by + 1}",
        ]
        for r, by in zip(rules, shadows, strict=True)
    ]


def _warn_newly_shadowed(rules: list[UsbRule], rule: UsbRule) -> None:
    """After an insert, say which later rules the new one now decides for."""
    hidden = [str(i + 1) for i, by in enumerate(policy.shadowed(rules)) if by == rule.position - 1]
    if hidden:
        click.echo(f"note: rule {rule.position} now shadows rule(s) {', '.join(hidden)}: they "
                   "can no longer decide any device", err=True)  # fmt: skip


@usb.command("list")
@click.argument("vm")
@json_option
@db_option
def list_(vm: str, as_json: bool, db: Location | None) -> None:
    """List the rules of VM in the order they are tried.

    A rule that comes after one matching every device it matches can never decide: the
    last column (and `shadowed_by` in --json, the position of that rule) says so.
    """
    rules = run(db, lambda r: r.list_usb_rules(vm), blocking=True)
    if as_json:
        shadows = policy.shadowed(rules)
        emit_json([{**r.to_json(), "shadowed_by": None if by is None else by + 1}
                   for r, by in zip(rules, shadows, strict=True)])  # fmt: skip
        return
    table(_rows(rules), ["#", "action", "vid:pid", "class", "interfaces", "serial", "shadowed"])


@usb.command("remove")
@click.argument("vm")
@click.argument("rule", metavar="POSITION|VID:PID")
@click.option(
    "--action",
    type=click.Choice([a.value for a in UsbAction]),
    help="With VID:PID: only the rules with this action.",
)
@db_option
def remove(vm: str, rule: str, action: str | None, db: Location | None) -> None:
    """Remove rule number POSITION, or every rule for exactly VID:PID; later rules move up.

    \b
    Examples:
      vmshield usb remove web1 2               # rule 2 (see `vmshield usb list web1`)
      vmshield usb remove web1 0781:5567       # every rule written for 0781:5567
      vmshield usb remove web1 '0781:*' --action block
    """
    if rule.isdecimal() and rule.isascii():
        if action is not None:
            raise click.UsageError("--action goes with VID:PID, not with a position")
        position = int(rule)
        if position < 1:
            raise click.BadParameter("positions start at 1", param_hint="POSITION")
        removed = run(db, lambda r: r.remove_usb_rule(vm, position, actor=actor()), blocking=True)
        click.echo(f"{vm}: removed rule {position}: {removed.describe()}")
        return
    vid, pid = _parse(rule, policy.parse_id_pair, "VID:PID")

    async def remove_matching(repo: Repository) -> list[UsbRule]:
        rules = await repo.list_usb_rules(vm)
        hits = [r for r in rules if (r.vendor_id, r.product_id) == (vid, pid)
                and (action is None or r.action.value == action)]  # fmt: skip
        for r in sorted(hits, key=lambda r: r.position, reverse=True):
            await repo.remove_usb_rule(vm, r.position, actor=actor())
        return hits

    removed_rules = run(db, remove_matching, blocking=True)
    if not removed_rules:
        what = f"{action} rule" if action else "rule"
        raise CliError(f"VM {vm!r} has no {what} for {rule} (see `vmshield usb list {vm}`)")
    for r in removed_rules:
        click.echo(f"{vm}: removed rule {r.position}: {r.describe()}")


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
def qemu_filter(vm: str, chardev: str, as_json: bool, db: Location | None) -> None:
    """Print QEMU's usb-redir `filter=` and libvirt's `<redirfilter>` for VM's rules.

    A second line of defence generated from the same whitelist: QEMU's own filter refuses
    what it refuses even if the gateway were bypassed. It knows only class, VID and PID and
    is fixed when QEMU starts, so rules with class/interface/serial are broadened (allow)
    or left out (block/reject): it never refuses what the gateway would forward. Regenerate
    it after changing rules; the gateway applies changes live.
    """
    from usbgate.rules import qemu_filter as qf  # urllib, xml: not for the live rule commands

    result = qf.report(vm, run(db, lambda r: r.list_usb_rules(vm), blocking=True))
    if as_json:
        emit_json(result.device_json(chardev))
        return
    click.echo(result.device_text(chardev))
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
