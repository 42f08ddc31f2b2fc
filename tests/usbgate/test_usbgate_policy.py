"""Policy engine, rule text, descriptor probing, and the static QEMU/libvirt filter."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usbgate.errors import RuleSyntaxError
from usbgate.probe import Contradiction, ProbeFailed, probe, reconcile
from usbgate.rules.policy import (
    Action,
    Device,
    Rule,
    decide,
    parse_class,
    parse_id_pair,
    parse_pattern,
    parse_rule,
    parse_rules,
)
from usbgate.rules.qemu_filter import (
    filter_allows,
    filter_rules,
    libvirt_redirfilter,
    qemu_filter_value,
    translation_notes,
    usbredir_filter_string,
)
from usbgate.simulator import HID_KEYBOARD, MASS_STORAGE, VENDOR, FakeDevice

STICK = Device(0x0781, 0x5567, 0, (MASS_STORAGE,), "4C530001")
STICK_WITH_KEYBOARD = Device(0x0781, 0x5567, 0, (MASS_STORAGE, HID_KEYBOARD), "4C530001")
KEYBOARD = Device(0x046D, 0xC31C, 0, (HID_KEYBOARD,))


def verdict(rules: str, device: Device) -> Action:
    return decide(parse_rules(rules), device).action


def test_default_is_block() -> None:
    assert verdict("", STICK) is Action.BLOCK
    assert "default block" in decide([], STICK).reason


def test_first_match_wins() -> None:
    assert verdict("allow id 0781:5567\nblock id 0781:*", STICK) is Action.ALLOW
    assert verdict("reject id 0781:*\nallow id 0781:5567", STICK) is Action.REJECT


def test_wildcards_class_and_serial() -> None:
    assert verdict("allow id 0781:*", STICK) is Action.ALLOW
    assert verdict("allow id *:5567", STICK) is Action.ALLOW
    assert verdict("allow id 0782:*", STICK) is Action.BLOCK
    assert verdict('allow id 0781:5567 serial "4C530001"', STICK) is Action.ALLOW
    assert verdict('allow id 0781:5567 serial "OTHER"', STICK) is Action.BLOCK
    assert verdict("allow class 00", STICK) is Action.ALLOW
    assert verdict("allow class 08", STICK) is Action.BLOCK  # bDeviceClass, not interfaces


def test_with_interface_needs_every_interface_covered() -> None:
    assert verdict("allow with-interface 08:06:50", STICK) is Action.ALLOW
    assert verdict("allow with-interface 08:*:*", STICK_WITH_KEYBOARD) is Action.BLOCK
    both = "allow with-interface { 08:*:* 03:01:01 }"
    assert verdict(both, STICK_WITH_KEYBOARD) is Action.ALLOW


def test_composite_passes_only_if_every_interface_is_allowed() -> None:
    rules = "block with-interface 03:*:*\nallow id 0781:5567"
    assert verdict(rules, STICK) is Action.ALLOW
    decision = decide(parse_rules(rules), STICK_WITH_KEYBOARD)
    assert decision.action is Action.BLOCK
    assert "interface 03:01:01" in decision.reason
    # storage and HID each allowed on their own do not make a storage+HID device allowed
    separately = "allow with-interface 08:*:*\nallow with-interface 03:*:*"
    assert verdict(separately, STICK) is Action.ALLOW
    assert verdict(separately, KEYBOARD) is Action.ALLOW
    assert verdict(separately, STICK_WITH_KEYBOARD) is Action.BLOCK


def test_reject_outranks_block() -> None:
    rules = "reject with-interface 03:*:*\nallow id 0781:5567 with-interface 08:*:*"
    assert verdict(rules, STICK_WITH_KEYBOARD) is Action.REJECT


def test_rule_text_round_trip() -> None:
    text = 'allow id 0781:5567 class 00 serial "a b" with-interface { 08:06:50 03:*:* }'
    rule = parse_rule(text)
    assert rule == Rule(Action.ALLOW, 0x0781, 0x5567, 0, ((8, 6, 0x50), (3, None, None)), "a b")
    assert parse_rule(str(rule)) == rule
    assert parse_rules("# comment\n\nblock id *:*  # all\n") == [Rule(Action.BLOCK)]


@pytest.mark.parametrize(
    "text",
    ["permit id 1:2", "allow id 12345:1", "allow id 0781", "allow class", "allow color red",
     "allow with-interface { 08:*:*", "allow with-interface { }", "allow with-interface 1:2:3:4",
     'allow serial "unterminated'],
)  # fmt: skip
def test_rule_syntax_errors(text: str) -> None:
    with pytest.raises(RuleSyntaxError):
        parse_rule(text)


@pytest.mark.parametrize(
    ("text", "want"),
    [("0781:5567", (0x781, 0x5567)), ("0781:*", (0x781, None)), ("*:*", (None, None)),
     ("abcd:EF01", (0xABCD, 0xEF01)), (" 0x0781:5567 ", (0x781, 0x5567))],
)  # fmt: skip
def test_parse_id_pair(text: str, want: tuple[int | None, int | None]) -> None:
    assert parse_id_pair(text) == want


@pytest.mark.parametrize("text", ["0781", "0781:5567:1", "12345:1", "g:1", ":", "0781:"])
def test_parse_id_pair_rejects(text: str) -> None:
    with pytest.raises(RuleSyntaxError):
        parse_id_pair(text)


def test_parse_pattern_and_class() -> None:
    assert parse_pattern("08:06:50") == (8, 6, 0x50)
    assert parse_pattern("03") == (3, None, None)
    assert parse_pattern("ff:*:01") == (0xFF, None, 1)
    assert parse_class("0x09") == 9
    for bad in ("1:2:3:4", "100", "x"):
        with pytest.raises(RuleSyntaxError):
            parse_pattern(bad)
    for bad in ("*", "100", ""):
        with pytest.raises(RuleSyntaxError):
            parse_class(bad)


def test_syntax_errors_are_value_errors_for_the_cli() -> None:
    """The CLI turns ValueError into a usage error: RuleSyntaxError must be one."""
    with pytest.raises(ValueError, match="VID must be 4 hex digits"):
        parse_id_pair("07810:1")


# --- probing --------------------------------------------------------------------------------


def run_probe(device: FakeDevice):  # type: ignore[no-untyped-def]
    async def read(value: int, index: int, length: int) -> bytes:
        data = device.descriptor(value)
        if data is None:
            raise ProbeFailed("stall")
        return data[:length]

    return asyncio.run(probe(read))


def test_probe_reads_descriptors_and_serial() -> None:
    fake = FakeDevice(interfaces=(MASS_STORAGE, HID_KEYBOARD))
    result = run_probe(fake)
    assert (result.device.vendor_id, result.device.product_id) == (0x0781, 0x5567)
    assert result.serial == "4C530001"
    assert result.interface_triples() == (MASS_STORAGE, HID_KEYBOARD)
    device = reconcile(fake.device_connect(), fake.interface_info(), result, bcd_announced=True)
    assert device.interfaces == (MASS_STORAGE, HID_KEYBOARD)


def test_descriptors_contradicting_the_announcement() -> None:
    liar = FakeDevice(descriptor_vendor_id=0x1234)
    with pytest.raises(Contradiction, match="descriptor says 1234:5567"):
        reconcile(liar.device_connect(), liar.interface_info(), run_probe(liar),
                  bcd_announced=True)  # fmt: skip
    hidden = FakeDevice(interfaces=(MASS_STORAGE,), descriptor_interfaces=(HID_KEYBOARD,))
    with pytest.raises(Contradiction, match="in no configuration descriptor"):
        reconcile(hidden.device_connect(), hidden.interface_info(), run_probe(hidden),
                  bcd_announced=True)  # fmt: skip


def test_policy_judges_every_described_interface() -> None:
    # announces only storage, but its configuration also has a vendor interface
    sneaky = FakeDevice(interfaces=(MASS_STORAGE,), descriptor_interfaces=(MASS_STORAGE, VENDOR))
    device = reconcile(sneaky.device_connect(), sneaky.interface_info(), run_probe(sneaky),
                       bcd_announced=True)  # fmt: skip
    assert device.interfaces == (MASS_STORAGE, VENDOR)
    assert verdict("allow with-interface 08:*:*", device) is Action.BLOCK


# --- static filter --------------------------------------------------------------------------


def test_qemu_filter_strings() -> None:
    rules = parse_rules("allow id 0781:5567 with-interface 08:*:*\nblock id 046d:*\n"
                        "reject class 03\nallow id 1234:*")  # fmt: skip
    assert qemu_filter_value(rules) == (
        "-1:0x0781:0x5567:-1:1|-1:0x046d:-1:-1:0|-1:0x1234:-1:-1:1|-1:-1:-1:-1:0"
    )
    assert usbredir_filter_string(rules).startswith("-1,0x0781,0x5567,-1,1|")
    xml = libvirt_redirfilter(rules)
    assert '<usbdev vendor="0x0781" product="0x5567" allow="yes"/>' in xml
    assert xml.splitlines()[-2].strip() == '<usbdev allow="no"/>'
    assert translation_notes(rules) == [
        "rule 1 (allow): class/interface/serial broadened to its VID:PID",
        "rule 3 (reject): class/interface/serial left out",
    ]
    assert qemu_filter_value([]) == "-1:-1:-1:-1:0"
    # a catch-all ends the list: nothing after it is reachable
    assert qemu_filter_value(parse_rules("block id *:*\nallow id 0781:*")) == "-1:-1:-1:-1:0"
    assert qemu_filter_value(parse_rules("allow id *:*\nblock id 0781:*")) == "-1:-1:-1:-1:1"


hex16 = st.one_of(st.none(), st.sampled_from([0x0781, 0x5567, 0x046D, 0x1234]))
triples = st.sampled_from([MASS_STORAGE, HID_KEYBOARD, VENDOR, (0x03, 0x00, 0x00)])
patterns = st.tuples(st.sampled_from([None, 0x08, 0x03, 0xFF]), st.none(), st.none())
rules_strategy = st.lists(
    st.builds(Rule, st.sampled_from(list(Action)), hex16, hex16,
              st.one_of(st.none(), st.sampled_from([0, 3, 8, 0xEF])),
              st.one_of(st.none(), st.lists(patterns, min_size=1, max_size=2).map(tuple)),
              st.one_of(st.none(), st.just("S1"))),
    max_size=5,
)  # fmt: skip
devices_strategy = st.builds(
    Device, st.sampled_from([0x0781, 0x046D, 0x1234]), st.sampled_from([0x5567, 0xC31C]),
    st.sampled_from([0, 3, 8, 0xEF, 0xFF]), st.lists(triples, max_size=3).map(tuple),
    st.sampled_from([None, "S1"]),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(rules_strategy, devices_strategy)
def test_static_filter_never_refuses_what_the_gateway_forwards(
    rules: list[Rule], device: Device
) -> None:
    if decide(rules, device).allowed:
        assert filter_allows(
            filter_rules(rules),
            device_class=device.device_class,
            vendor_id=device.vendor_id,
            product_id=device.product_id,
            interface_classes=[i[0] for i in device.interfaces],
        )
