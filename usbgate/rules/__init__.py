"""The USB rule model: the leaf that usbgate and the keystore both import.

- policy: the one USBGuard-like rule model, its grammar, the first-match decision and
  shadowing (the keystore stores these rules, the gateway applies them);
- qemu_filter: QEMU ``filter=`` and libvirt ``<redirfilter>`` from the same rules;
- errors: ``RuleSyntaxError`` and usbgate's base error.

It imports nothing of vmshield but nbd_plugin.errors (an import-linter contract in
pyproject.toml), so the keystore can store rules without depending on the gateway.
"""
