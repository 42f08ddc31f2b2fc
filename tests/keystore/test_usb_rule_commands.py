"""`vmshield usb allow/block/reject/remove/list` take effect as an admin expects (issue 14 item 5).

First match wins, so a rule placed behind a broader one can never decide: the commands put a
new rule where it takes effect, or refuse naming the rule in the way, and `usb list` marks
the rules that can never decide.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.cli import vms
from usbgate.rules.policy import Action, Device, ShadowedRule, covers, decide, parse_rule, place


def js(*args: str, code: int = 0) -> Any:
    return json.loads(vms(*args, "--json", code=code).output)


def actions(vm: str = "web1") -> list[tuple[int, str, str]]:
    return [(r["position"], r["action"], f"{r['vendor_id']}:{r['product_id']}")
            for r in js("usb", "list", vm)]  # fmt: skip


STICK = Device(0x0781, 0x5567, 0, ((8, 6, 0x50),))


def test_block_after_allow_blocks(ready: object) -> None:
    """The finding: the block was appended behind the allow, exited 0 and changed nothing."""
    vms("usb", "allow", "web1", "0781:5567")
    r = vms("usb", "block", "web1", "0781:5567")
    assert "rule 1: block id 0781:5567" in r.output
    assert "inserted before rule 1 'allow id 0781:5567'" in r.output
    assert actions() == [(1, "block", "0781:5567"), (2, "allow", "0781:5567")]
    rules = js("usb", "list", "web1")
    assert [x["shadowed_by"] for x in rules] == [None, 1]
    from keystore.sqlite.usbrules import load_rules

    stored = load_rules(ready, "web1")  # type: ignore[arg-type]
    assert decide(stored, STICK).action is Action.BLOCK


def test_a_narrow_exception_goes_before_the_broad_rule(ready: object) -> None:
    vms("usb", "block", "web1", "0781:*")
    vms("usb", "allow", "web1", "0781:5567")  # covered by the block: goes first
    vms("usb", "block", "web1", "046d:*")  # not covered: appended
    assert actions() == [(1, "allow", "0781:5567"), (2, "block", "0781:*"),
                         (3, "block", "046d:*")]  # fmt: skip


def test_a_rule_already_decided_the_same_way_is_not_added(ready: object) -> None:
    vms("usb", "block", "web1", "0781:*")
    r = vms("usb", "block", "web1", "0781:5567")
    assert "not added: rule 1 'block id 0781:*' already blocks" in r.output
    out = js("usb", "block", "web1", "0781:5567")
    assert out["added"] is False and "rule 1" in out["note"]
    assert actions() == [(1, "block", "0781:*")]


def test_an_explicit_position_behind_the_shadowing_rule_is_refused(ready: object) -> None:
    vms("usb", "allow", "web1", "0781:5567")
    vms("usb", "allow", "web1", "046d:*")
    r = vms("usb", "block", "web1", "0781:5567", "--position", "2", code=1)
    assert "rule 1 'allow id 0781:5567'" in r.output and "--position 1" in r.output
    assert actions() == [(1, "allow", "0781:5567"), (2, "allow", "046d:*")]
    r = vms("usb", "block", "web1", "*:*", "--position", "1")
    assert "now shadows rule(s) 2, 3" in r.output
    table = vms("usb", "list", "web1").output
    assert table.count("shadowed by #1") == 2


def test_remove_by_pattern_and_by_position(ready: object) -> None:
    vms("usb", "allow", "web1", "0781:5567", "--interface", "08:06:50")
    vms("usb", "reject", "web1", "1234:*")
    vms("usb", "block", "web1", "0781:5567", "--serial", "X", "--position", "1")
    r = vms("usb", "remove", "web1", "0781:5567")
    assert r.output.count("removed rule") == 2
    assert actions() == [(1, "reject", "1234:*")]
    assert "has no rule for 0781:5567" in vms("usb", "remove", "web1", "0781:5567", code=1).output
    vms("usb", "allow", "web1", "1234:*", "--position", "1")
    vms("usb", "remove", "web1", "1234:*", "--action", "reject")
    assert actions() == [(1, "allow", "1234:*")]
    vms("usb", "remove", "web1", "1")
    assert actions() == []
    assert "positions start at 1" in vms("usb", "remove", "web1", "0", code=2).output


@pytest.mark.parametrize(
    ("broad", "narrow", "want"),
    [("allow id 0781:*", "block id 0781:5567", True),
     ("allow id 0781:5567", "block id 0781:*", False),
     ("block class 03", "allow id 0781:5567 class 03", True),
     ("block with-interface 03:*:*", "allow id 0781:5567", False),
     ("block with-interface 03:*:*", "allow with-interface 03:01:01", True),
     ("block with-interface { 03:*:* 08:*:* }", "allow with-interface { 08:06:50 03:01:01 }",
      True),
     ("block with-interface 03:*:*", "allow with-interface { 08:06:50 03:01:01 }", False),
     ('allow serial "A"', 'block id 0781:5567 serial "A"', True),
     ('allow serial "A"', "block id 0781:5567", False)],
)  # fmt: skip
def test_covers(broad: str, narrow: str, want: bool) -> None:
    assert covers(parse_rule(broad), parse_rule(narrow)) is want


def test_place_is_what_decide_then_does() -> None:
    """Wherever place() puts a rule, decide() lets it decide the devices it matches."""
    rules = [parse_rule(t) for t in ("allow id 0781:5567", "block id 046d:*", "allow id *:*")]
    new = parse_rule("block id 0781:5567")
    where = place(rules, new)
    assert where.index == 0
    assert decide([new, *rules], STICK).action is Action.BLOCK
    with pytest.raises(ShadowedRule, match="rule 1"):
        place(rules, new, position=3)
    assert place(rules, parse_rule("reject id 1111:2222")).index == 2  # before 'allow *:*'
