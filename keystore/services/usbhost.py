"""The keystore's side of a running `usbgate host serve`: one request over its control socket.

The keystore imports nothing of usbgate but its rule model, so the libvirt hook (adding and
removing a VM) and `vmshield status` (which VMs it serves) speak its control protocol through
the shared client (nbd_plugin.osutil.jsonctl): a JSON object per line, `{"ok": true, ...}` or
`{"ok": false, "error": "..."}` back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keystore.errors import KeystoreError
from nbd_plugin.osutil import jsonctl

#: where `usbgate host serve` listens for control by default (its --control)
DEFAULT_CONTROL = Path("/run/vmshield/usbgate.ctl")


class UsbHostError(KeystoreError):
    """The usbgate host could not be reached, or refused (its one-line reason)."""


def request(path: str | Path, message: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """`message` to the usbgate host at `path`; its answer if it says ok, else UsbHostError."""
    return jsonctl.call(path, message, timeout=timeout, who="the usbgate host", error=UsbHostError)
