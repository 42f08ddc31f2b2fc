"""The USB devices plugged into this host, read with pyusb (libusb), for `usbgate devices`.

Useful to write rules: it shows the VID:PID, class, interface classes and serial the
gateway will see when the device is offered. Hosts without a USB stack (no /sys/bus/usb,
as in many VMs and containers) or without libusb get a plain ``NoUsbStack`` instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from usbgate.errors import UsbgateError
from usbgate.rules.policy import format_pattern

SYSFS_USB = Path("/sys/bus/usb")


class NoUsbStack(UsbgateError):
    """This host cannot enumerate USB devices (no USB stack, or no libusb backend)."""


@dataclass(frozen=True)
class LocalDevice:
    """One USB device on this host."""

    bus: int
    address: int
    vendor_id: int
    product_id: int
    device_class: int
    interfaces: tuple[tuple[int, int, int], ...]
    serial: str | None
    manufacturer: str | None
    product: str | None

    @property
    def vid_pid(self) -> str:
        return f"{self.vendor_id:04x}:{self.product_id:04x}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["vid_pid"] = self.vid_pid
        out["device_class"] = f"{self.device_class:02x}"
        out["interfaces"] = [format_pattern(i) for i in self.interfaces]
        return out

    def rule(self) -> str:
        """A rule that allows exactly this device (policy text syntax)."""
        text = f"allow id {self.vid_pid}"
        if self.serial:
            text += f' serial "{self.serial}"'
        if self.interfaces:
            text += " with-interface { " + " ".join(format_pattern(i) for i in self.interfaces)
            text += " }"
        return text


def _string(dev: Any, index: int) -> str | None:
    if not index:
        return None
    import usb.util

    try:
        return str(usb.util.get_string(dev, index))
    except (ValueError, NotImplementedError, OSError):  # no permission, no langid
        return None


def list_devices(sysfs: Path = SYSFS_USB) -> list[LocalDevice]:
    """Every USB device libusb can see; NoUsbStack when there can be none."""
    if not sysfs.exists():
        raise NoUsbStack(f"this host has no USB stack ({sysfs} does not exist): no local devices")
    try:
        import usb.core
    except ImportError as exc:  # pragma: no cover - pyusb is a dependency
        raise NoUsbStack(f"pyusb is not installed: {exc}") from exc
    try:
        found = list(usb.core.find(find_all=True))
    except usb.core.NoBackendError as exc:
        raise NoUsbStack("no libusb backend: install libusb-1.0-0") from exc
    devices = []
    for dev in found:
        triples: dict[tuple[int, int, int], None] = {}
        for config in dev:
            for intf in config:
                triples[(intf.bInterfaceClass, intf.bInterfaceSubClass,
                         intf.bInterfaceProtocol)] = None  # fmt: skip
        devices.append(
            LocalDevice(
                bus=int(dev.bus or 0),
                address=int(dev.address or 0),
                vendor_id=int(dev.idVendor),
                product_id=int(dev.idProduct),
                device_class=int(dev.bDeviceClass),
                interfaces=tuple(triples),
                serial=_string(dev, dev.iSerialNumber),
                manufacturer=_string(dev, dev.iManufacturer),
                product=_string(dev, dev.iProduct),
            )
        )
    return sorted(devices, key=lambda d: (d.bus, d.address))
