"""Exceptions raised by usbgate, split by what the caller can do about them.

They derive from the product's one hierarchy (nbd_plugin.errors.VmshieldError), so a caller
of any vmshield part can catch everything vmshield raises on purpose with one class.
"""

from __future__ import annotations

from nbd_plugin.errors import VmshieldError


class UsbgateError(VmshieldError):
    """Base class of every error usbgate raises on purpose."""


class ProtocolError(UsbgateError):
    """The peer sent bytes that are not valid usbredir: the connection is dead, close it."""


class RuleSyntaxError(UsbgateError, ValueError):
    """A USB rule's text form could not be parsed; the message says where."""


class RuleSourceError(UsbgateError):
    """The rules for a VM could not be read (missing database, unknown schema, unknown VM)."""
