"""The USB policy engine: USBGuard-like rules, first match wins, default block.

A rule sets any of: VID:PID (``*`` wildcards), the device class (bDeviceClass), interface
patterns ``CC:SS:PP`` (``with-interface``; ``*`` wildcards) and the serial number. A rule
matches a device when every field it sets matches; ``with-interface`` matches when *every*
interface of the device matches at least one of its patterns (so a rule for storage
interfaces does not let a keyboard interface ride along). ``id *:*`` (or no ``id``)
matches every VID:PID.

Composite devices are judged twice over: the device as a whole, and then each interface on its
own (the device seen with only that interface). Every one of those verdicts must be ``allow``
for the device to pass; if any is ``reject`` the result is ``reject``, else ``block``. So with

    block with-interface 03:*:*
    allow id 0781:5567

a 0781:5567 that is storage *plus* a HID keyboard is blocked: its keyboard interface, judged
alone, meets the block rule first. This is the only place a device is judged: the keystore
stores rules, and QEMU's static filter is generated so that it never refuses a device this
engine allows.

The keystore stores these rules (keystore.models.UsbRule is a Rule with its row id,
VM and position) and loads them back; it has no rule semantics of its own.

Text form, one rule per line (``#`` comments)::

    allow id 0781:5567 serial "4C530001" with-interface { 08:06:50 }
    block class 03
    reject id 1234:*
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from usbgate.rules.errors import RuleSyntaxError

Pattern = tuple[int | None, int | None, int | None]
InterfaceTriple = tuple[int, int, int]
T = TypeVar("T")


class Action(enum.StrEnum):
    """What a rule does with a matching device."""

    ALLOW = "allow"
    """Forward the device to the VM."""
    BLOCK = "block"
    """Do not forward it; tell the owner (filter_reject), keep the connection."""
    REJECT = "reject"
    """Do not forward it; tell the owner and close the connection."""


@dataclass(frozen=True)
class Device:
    """What the policy decides on: the announcement, checked against the descriptors."""

    vendor_id: int
    product_id: int
    device_class: int = 0
    interfaces: tuple[InterfaceTriple, ...] = ()
    serial: str | None = None
    device_subclass: int = 0
    device_protocol: int = 0
    bcd_device: int = 0

    def describe(self) -> dict[str, object]:
        """A JSON-able summary for the audit trail."""
        return {
            "vid_pid": f"{self.vendor_id:04x}:{self.product_id:04x}",
            "class": f"{self.device_class:02x}",
            "interfaces": [format_pattern(i) for i in self.interfaces],
            "serial": self.serial,
            "bcd_device": f"{self.bcd_device:04x}",
        }


@dataclass(frozen=True)
class Rule:
    """One whitelist rule; ``None`` fields match anything."""

    action: Action
    vendor_id: int | None = None
    product_id: int | None = None
    device_class: int | None = None
    interfaces: tuple[Pattern, ...] | None = None
    serial: str | None = None

    def matches(self, device: Device) -> bool:
        """True when every field this rule sets matches ``device``."""
        if self.vendor_id is not None and self.vendor_id != device.vendor_id:
            return False
        if self.product_id is not None and self.product_id != device.product_id:
            return False
        if self.device_class is not None and self.device_class != device.device_class:
            return False
        if self.serial is not None and self.serial != device.serial:
            return False
        if self.interfaces is not None:
            if not device.interfaces:
                return False
            return all(
                any(pattern_matches(p, iface) for p in self.interfaces)
                for iface in device.interfaces
            )
        return True

    def __str__(self) -> str:
        """The text form, which parse_rule reads back to an equal rule."""
        parts = [str(self.action), f"id {format_id(self.vendor_id)}:{format_id(self.product_id)}"]
        if self.device_class is not None:
            parts.append(f"class {self.device_class:02x}")
        if self.interfaces is not None:
            inner = " ".join(format_pattern(p) for p in self.interfaces)
            parts.append(f"with-interface {{ {inner} }}" if len(self.interfaces) > 1
                         else f"with-interface {inner}")  # fmt: skip
        if self.serial is not None:
            parts.append("serial " + quote(self.serial))
        return " ".join(parts)

    def describe(self) -> str:
        """The one-line text form (``str(rule)``), e.g. ``allow id 0781:5567 with-interface
        08:06:50``."""
        return str(self)

    def to_json(self) -> dict[str, Any]:
        """The rule's fields as JSON-able text (``*`` for a wildcard id, ``None`` if unset)."""
        return {
            "action": self.action.value,
            "vendor_id": format_id(self.vendor_id),
            "product_id": format_id(self.product_id),
            "device_class": None if self.device_class is None else f"{self.device_class:02x}",
            "interfaces": None
            if self.interfaces is None
            else [format_pattern(p) for p in self.interfaces],
            "serial": self.serial,
        }


@dataclass(frozen=True)
class Decision:
    """The verdict on a device and the rule (or default) behind it, for logs and the audit."""

    action: Action
    reason: str
    rule: Rule | None = field(default=None, compare=False)

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW


def pattern_matches(pattern: Pattern, iface: InterfaceTriple) -> bool:
    return all(want is None or want == got for want, got in zip(pattern, iface, strict=True))


def _first_match(rules: Sequence[Rule], device: Device) -> tuple[Action, Rule | None]:
    for rule in rules:
        if rule.matches(device):
            return rule.action, rule
    return Action.BLOCK, None


def decide(rules: Sequence[Rule], device: Device) -> Decision:
    """The verdict on ``device``: the whole device, then each interface alone, must be allowed."""
    views = [("device", device)]
    views += [
        (f"interface {format_pattern(iface)}", replace(device, interfaces=(iface,)))
        for iface in dict.fromkeys(device.interfaces)
    ]
    worst: Decision | None = None
    for what, view in views:
        action, rule = _first_match(rules, view)
        if action is Action.ALLOW:
            continue
        reason = f"{what}: " + (f"rule '{rule}'" if rule else "no rule matches (default block)")
        if worst is None or (action is Action.REJECT and worst.action is not Action.REJECT):
            worst = Decision(action, reason, rule)
    if worst is not None:
        return worst
    _, rule = _first_match(rules, device)
    return Decision(Action.ALLOW, f"rule '{rule}'", rule)


# --- shadowing: first match wins, so a rule behind a broader one never decides --------------


def _field_covers(broad: object, narrow: object) -> bool:
    return broad is None or broad == narrow


def _pattern_covers(broad: Pattern, narrow: Pattern) -> bool:
    return all(_field_covers(b, n) for b, n in zip(broad, narrow, strict=True))


def covers(broad: Rule, narrow: Rule) -> bool:
    """True when ``broad`` matches every device ``narrow`` matches (so, placed first, it
    decides every device ``narrow`` would). Conservative: a False may still be covered by
    several rules together."""
    fields = ("vendor_id", "product_id", "device_class", "serial")
    if not all(_field_covers(getattr(broad, f), getattr(narrow, f)) for f in fields):
        return False
    if broad.interfaces is None:
        return True
    if narrow.interfaces is None:  # narrow also matches devices broad's patterns leave out
        return False
    return all(any(_pattern_covers(b, n) for b in broad.interfaces) for n in narrow.interfaces)


def shadowing(rules: Sequence[Rule], rule: Rule) -> int | None:
    """The index in ``rules`` of the first rule that covers ``rule`` (``rule`` placed after
    it could never be the first match), or None."""
    return next((i for i, earlier in enumerate(rules) if covers(earlier, rule)), None)


def shadowed(rules: Sequence[Rule]) -> list[int | None]:
    """For each rule, the index of the first earlier rule that shadows it, or None."""
    return [shadowing(rules[:i], rule) for i, rule in enumerate(rules)]


@dataclass(frozen=True)
class Placement:
    """Where a new rule goes so that it takes effect, decided by ``place``."""

    index: int | None
    """0-based index to insert at; None: do not add (an equal or broader rule with the same
    action already decides these devices)."""
    note: str
    """What the admin is told ('' when the rule simply goes where asked)."""


class ShadowedRule(RuleSyntaxError):
    """The rule, at the position asked, would come after a rule that decides its devices."""


def place(rules: Sequence[Rule], rule: Rule, position: int | None = None) -> Placement:
    """Where ``rule`` must go among ``rules`` to take effect (first match wins).

    Without ``position`` (1-based), a rule covered by an earlier rule with another action is
    put just before it (``block id 0781:5567`` after ``allow id 0781:5567`` must block);
    covered by one with the same action, it is not added. With ``position``, a rule that
    would come after a covering rule of another action is refused (ShadowedRule, naming it).
    """
    end = len(rules) if position is None else min(position - 1, len(rules))
    at = shadowing(rules[:end], rule)
    if at is None:
        return Placement(end, "")
    earlier = rules[at]
    if earlier.action is rule.action:
        return Placement(None, f"not added: rule {at + 1} '{earlier}' already {rule.action}s "
                               "every device this rule matches")  # fmt: skip
    if position is not None:
        raise ShadowedRule(
            f"rule {at + 1} '{earlier}' matches every device this rule matches and comes "
            f"first, so at position {position} this rule would never decide; use "
            f"--position {at + 1} (or lower) to put it before, or remove rule {at + 1}"
        )
    return Placement(at, f"inserted before rule {at + 1} '{earlier}', which matches every "
                         "device this rule matches and would have decided first")  # fmt: skip


# --- text form ----------------------------------------------------------------------------


def format_id(value: int | None) -> str:
    return "*" if value is None else f"{value:04x}"


def format_pattern(p: Pattern | InterfaceTriple) -> str:
    return ":".join("*" if v is None else f"{v:02x}" for v in p)


def quote(text: str) -> str:
    """``text`` in double quotes, as parse_rule (shlex) reads it back."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _hex(text: str, digits: int, what: str) -> int | None:
    if text == "*":
        return None
    t = text.lower().removeprefix("0x")
    if not t or len(t) > digits or any(c not in "0123456789abcdef" for c in t):
        size = "a hex byte" if digits == 2 else f"{digits} hex digits"
        raise RuleSyntaxError(f"{what} must be {size} or '*', got {text!r}")
    return int(t, 16)


def parse_id_pair(text: str) -> tuple[int | None, int | None]:
    """``VID:PID`` in hex with ``*`` wildcards, e.g. ``0781:5567``, ``0781:*``, ``*:*``."""
    vid, sep, pid = text.strip().partition(":")
    if not sep:
        raise RuleSyntaxError(f"id must be VID:PID in hex (e.g. 0781:5567 or 0781:*), got {text!r}")
    return _hex(vid, 4, "VID"), _hex(pid, 4, "PID")


def parse_class(text: str) -> int:
    """A USB class code as a hex byte (``08``, ``0x08``); no wildcard."""
    value = None if text.strip() == "*" else _hex(text.strip(), 2, "USB class")
    if value is None:
        raise RuleSyntaxError(f"USB class must be a hex byte such as 08 or 03, got {text!r}")
    return value


def parse_pattern(text: str) -> Pattern:
    """``CC:SS:PP`` in hex with ``*`` wildcards; ``CC`` alone means ``CC:*:*``."""
    parts = text.strip().split(":")
    if not 1 <= len(parts) <= 3:
        raise RuleSyntaxError(f"interface must be CC:SS:PP in hex (e.g. 08:06:50), got {text!r}")
    parts += ["*"] * (3 - len(parts))
    cls, sub, proto = (_hex(p, 2, "interface field") for p in parts)
    return cls, sub, proto


def parse_rule(line: str) -> Rule:
    """One rule from its text form (see the module docstring)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError as exc:
        raise RuleSyntaxError(f"{line!r}: {exc}") from None
    if not words:
        raise RuleSyntaxError("empty rule")
    try:
        action = Action(words[0])
    except ValueError:
        raise RuleSyntaxError(f"{line!r}: must start with allow, block or reject") from None
    rule = Rule(action)
    rest = words[1:]
    while rest:
        key = rest.pop(0)
        if not rest:
            raise RuleSyntaxError(f"{line!r}: {key!r} needs a value")
        value = rest.pop(0)
        if key == "id":
            vid, pid = _in_rule(line, parse_id_pair, value)
            rule = replace(rule, vendor_id=vid, product_id=pid)
        elif key == "class":
            cls = _in_rule(line, lambda v: _hex(v, 2, "class"), value)
            rule = replace(rule, device_class=cls)
        elif key == "serial":
            rule = replace(rule, serial=value)
        elif key == "with-interface":
            texts = [value]
            if value == "{":
                if "}" not in rest:
                    raise RuleSyntaxError(f"{line!r}: '{{' without '}}'")
                end = rest.index("}")
                texts, rest = rest[:end], rest[end + 1 :]
                if not texts:
                    raise RuleSyntaxError(f"{line!r}: empty interface set")
            patterns = tuple(_in_rule(line, parse_pattern, t) for t in texts)
            rule = replace(rule, interfaces=patterns)
        else:
            raise RuleSyntaxError(f"{line!r}: unknown keyword {key!r}")
    return rule


def _in_rule(line: str, parse: Callable[[str], T], value: str) -> T:
    try:
        return parse(value)
    except RuleSyntaxError as exc:
        raise RuleSyntaxError(f"{line!r}: {exc}") from None


def parse_rules(text: str | Iterable[str]) -> list[Rule]:
    """Rules from text, one per line; blank lines and ``#`` comments are skipped."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    return [parse_rule(line) for line in lines if line.split("#", 1)[0].strip()]
