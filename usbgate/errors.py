"""Exceptions raised by usbgate, split by what the caller can do about them.

They derive from the product's one hierarchy (nbd_plugin.errors.VmshieldError), so a caller
of any vmshield part can catch everything vmshield raises on purpose with one class. The base
and the rule syntax error are the rule model's (usbgate.rules.errors, the leaf the keystore
imports too); they are named here as well so usbgate's modules import their errors from one
place.
"""

from __future__ import annotations

from usbgate.rules.errors import RuleSyntaxError, UsbgateError

__all__ = ["ProtocolError", "RuleSourceError", "RuleSyntaxError", "UsbgateError"]


class ProtocolError(UsbgateError):
    """The peer sent bytes that are not valid usbredir: the connection is dead, close it."""


class RuleSourceError(UsbgateError):
    """The rules for a VM could not be read (missing database, unknown schema, unknown VM)."""
