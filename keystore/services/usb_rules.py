"""Adding a USB rule where it takes effect, as one step against other admins (issue 20 C).

The first matching rule decides, so where a new rule goes depends on the rules already there
(usbgate.rules.policy.place). Reading them and inserting were two transactions: a rule another
admin added in between could land before the new one and shadow it. Now the insert carries
the ids of the rules it was placed against and the repository refuses it (Conflict) inside
its write transaction if they changed; the placement is then made again on the new rules.
"""

from __future__ import annotations

from collections.abc import Sequence

from keystore.errors import Conflict
from keystore.models import UsbAction, UsbRule
from keystore.repository import Repository
from usbgate.rules import policy
from usbgate.rules.policy import Pattern

#: placements tried before giving up (each lost race means another admin's rule went in)
ATTEMPTS = 5


async def add_rule(
    repo: Repository,
    vm: str,
    action: UsbAction,
    vendor_id: int | None,
    product_id: int | None,
    *,
    actor: str,
    device_class: int | None = None,
    interfaces: Sequence[Pattern] | None = None,
    serial: str | None = None,
    position: int | None = None,
) -> tuple[UsbRule | None, policy.Placement]:
    """Place and insert the rule atomically; (the rule or None if not needed, the placement).

    ShadowedRule (from `policy.place`) if `position` puts it behind a rule deciding first."""
    pats = tuple(interfaces) if interfaces else None
    wanted = policy.Rule(action, vendor_id, product_id, device_class, pats, serial)
    for _ in range(ATTEMPTS):
        rules = await repo.list_usb_rules(vm)
        where = policy.place(rules, wanted, position)
        if where.index is None:
            return None, where
        try:
            rule = await repo.add_usb_rule(
                vm, action, vendor_id, product_id, actor=actor, device_class=device_class,
                interfaces=pats, serial=serial, position=where.index + 1,
                expect=[r.id for r in rules],
            )  # fmt: skip
        except Conflict:
            continue
        return rule, where
    raise Conflict(
        f"the USB rules of VM {vm} changed {ATTEMPTS} times while this rule was being placed "
        "(other admins at work?); run the command again"
    )
