"""The errors the rule model raises, and the base of every usbgate error.

They live here, in the leaf, so that the rule model imports nothing of vmshield but the
product's one hierarchy (nbd_plugin.errors); usbgate.errors adds the gateway's own errors
below the same base.
"""

from __future__ import annotations

from nbd_plugin.errors import VmshieldError


class UsbgateError(VmshieldError):
    """Base class of every error usbgate raises on purpose."""


class RuleSyntaxError(UsbgateError, ValueError):
    """A USB rule's text form could not be parsed; the message says where."""
