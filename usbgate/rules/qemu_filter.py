"""QEMU's static ``filter=`` and libvirt's ``<redirfilter>`` from the same rules as the gateway.

Defence in depth: the usb-redir device itself refuses what its filter refuses, even if the
gateway were bypassed. QEMU's filter (usbredirfilter) knows only class, VID, PID and bcdDevice,
checks the device class and then each interface class, and cannot change after the device
is realized, so it can only approximate the live policy. The translation keeps one invariant:

    the static filter never refuses a device the gateway would forward.

(Otherwise an allowed device could not attach.) The gateway matches ``class`` against the
device class only and ``with-interface`` against the set of all interfaces, while the filter
applies a class to every pass (device and each interface); neither maps exactly. Hence:

- allow rules keep only VID:PID; ``class``, ``serial`` and ``with-interface`` are left out,
  which makes the filter rule broader;
- block/reject rules that carry ``class``, ``serial`` or ``with-interface`` are left out
  entirely (a broader deny could refuse allowed devices);
- the order is kept, and the list ends with an explicit deny-everything rule (QEMU's default
  is deny, too).

Why this keeps the invariant: if the gateway forwards a device, its first matching rule R is
an allow; every deny left in the filter is a plain VID:PID rule and so, had it matched the
device, would have matched before R in the gateway too. In every filter pass the broadened R
(or an earlier allow) is therefore the first match.

The gateway stays the authority; the filter only narrows what a bypass could reach.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from usbgate.rules.policy import Action, Rule


@dataclass(frozen=True)
class FilterRule:
    """One usbredirfilter rule: ``None`` is -1 (any)."""

    device_class: int | None
    vendor_id: int | None
    product_id: int | None
    allow: bool
    device_version: int | None = None

    def fields(self) -> list[str]:
        def fmt(value: int | None, width: int) -> str:
            return "-1" if value is None else f"0x{value:0{width}x}"

        return [
            fmt(self.device_class, 2),
            fmt(self.vendor_id, 4),
            fmt(self.product_id, 4),
            fmt(self.device_version, 4),
            "1" if self.allow else "0",
        ]


DENY_ALL = FilterRule(None, None, None, allow=False)


def _narrowed(rule: Rule) -> bool:
    return any(v is not None for v in (rule.device_class, rule.serial, rule.interfaces))


def translation_notes(rules: Sequence[Rule]) -> list[str]:
    """One line per rule the filter had to broaden or leave out, for the admin to read."""
    notes = []
    for n, rule in enumerate(rules, 1):
        if _narrowed(rule):
            what = "broadened to its VID:PID" if rule.action is Action.ALLOW else "left out"
            notes.append(f"rule {n} ({rule.action}): class/interface/serial {what}")
    return notes


def filter_rules(rules: Iterable[Rule]) -> list[FilterRule]:
    """The usbredirfilter rules for ``rules`` (see the module docstring for the invariant)."""
    out: list[FilterRule] = []
    for rule in rules:
        allow = rule.action is Action.ALLOW
        if not allow and _narrowed(rule):
            continue
        candidate = FilterRule(None, rule.vendor_id, rule.product_id, allow=allow)
        if candidate not in out:
            out.append(candidate)
        if candidate.vendor_id is None and candidate.product_id is None:
            return out  # matches every device: later rules are unreachable
    out.append(DENY_ALL)
    return out


def qemu_filter_value(rules: Iterable[Rule]) -> str:
    """The value for ``-device usb-redir,...,filter=VALUE`` (QEMU separates fields with ':')."""
    return "|".join(":".join(r.fields()) for r in filter_rules(rules))


def usbredir_filter_string(rules: Iterable[Rule]) -> str:
    """The same rules in usbredir's own syntax (',' between fields), as in filter_filter."""
    return "|".join(",".join(r.fields()) for r in filter_rules(rules))


def libvirt_redirfilter(rules: Iterable[Rule], indent: str = "  ") -> str:
    """A libvirt ``<redirfilter>`` element (goes inside ``<devices>``)."""
    lines = ["<redirfilter>"]
    for r in filter_rules(rules):
        attrs = []
        if r.device_class is not None:
            attrs.append(f"class={quoteattr(f'0x{r.device_class:02x}')}")
        if r.vendor_id is not None:
            attrs.append(f"vendor={quoteattr(f'0x{r.vendor_id:04x}')}")
        if r.product_id is not None:
            attrs.append(f"product={quoteattr(f'0x{r.product_id:04x}')}")
        attrs.append(f"allow={quoteattr('yes' if r.allow else 'no')}")
        lines.append(f"{indent}<usbdev {' '.join(attrs)}/>")
    lines.append("</redirfilter>")
    return "\n".join(lines)


def filter_allows(
    rules: Sequence[FilterRule],
    *,
    device_class: int,
    vendor_id: int,
    product_id: int,
    interface_classes: Sequence[int] = (),
    device_version: int = 0,
) -> bool:
    """usbredirfilter_check (flags 0) on ``rules``: device-class pass, then one per interface.

    The device-class pass is skipped for classes 0x00 and 0xef; every pass needs a matching
    rule and the first match decides. (usbredirfilter also skips non-boot HID interfaces of
    multi-interface devices; this model does not, so it is never more permissive.)
    """
    classes = [] if device_class in (0x00, 0xEF) else [device_class]
    for cls in [*classes, *interface_classes]:
        for r in rules:
            if all(
                want is None or want == got
                for want, got in (
                    (r.device_class, cls),
                    (r.vendor_id, vendor_id),
                    (r.product_id, product_id),
                    (r.device_version, device_version),
                )
            ):
                if not r.allow:
                    return False
                break
        else:
            return False
    return True


@dataclass(frozen=True)
class FilterReport:
    """Everything both qemu-filter commands print for a VM's rules (one translation)."""

    vm: str
    qemu_filter: str
    usbredir_filter: str
    libvirt_redirfilter: str
    notes: tuple[str, ...]

    def qemu_device(self, chardev: str) -> str:
        """The ``-device usb-redir`` argument that carries the filter."""
        return f"-device usb-redir,chardev={chardev},filter={self.qemu_filter}"

    def to_json(self) -> dict[str, object]:
        """``usbgate qemu-filter --json``."""
        return {
            "vm": self.vm,
            "qemu_filter": self.qemu_filter,
            "usbredir_filter": self.usbredir_filter,
            "libvirt_redirfilter": self.libvirt_redirfilter,
            "notes": list(self.notes),
        }

    def text(self) -> str:
        """``usbgate qemu-filter`` (the notes go to stderr)."""
        return f"filter={self.qemu_filter}\n{self.libvirt_redirfilter}"

    def device_json(self, chardev: str) -> dict[str, object]:
        """``vmshield usb qemu-filter --json``: with the whole ``-device`` argument."""
        return {
            "vm": self.vm,
            "filter": self.qemu_filter,
            "qemu_device": self.qemu_device(chardev),
            "libvirt_xml": self.libvirt_redirfilter,
            "notes": list(self.notes),
        }

    def device_text(self, chardev: str) -> str:
        """``vmshield usb qemu-filter`` (the notes go to stderr)."""
        return (
            f"QEMU:\n  '{self.qemu_device(chardev)}'\n\n"
            f"libvirt <devices> entry:\n{self.libvirt_redirfilter}"
        )


def report(vm: str, rules: Sequence[Rule]) -> FilterReport:
    """The static filter of ``vm`` in every form an admin needs."""
    return FilterReport(
        vm,
        qemu_filter_value(rules),
        usbredir_filter_string(rules),
        libvirt_redirfilter(rules),
        tuple(translation_notes(rules)),
    )
