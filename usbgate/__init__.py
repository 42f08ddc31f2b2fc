"""usbgate: a usbredir gateway that forwards only whitelisted USB devices to a VM.

Modules, bottom up:

- wire, controlpackets, datapackets, packets: the usbredir 0.7 wire format, one frozen
  dataclass per packet type; codec: the sans-IO ``Connection`` (receive_data/next_event/send).
- descriptors, probe: reading a held device's USB descriptors and checking them against
  its announcement.
- policy: USBGuard-like rules and the decision; qemu_filter: QEMU ``filter=`` and libvirt
  ``<redirfilter>`` from the same rules.
- sources, keystore_source: where rules come from and decisions go (keystore or text file).
- session, gateway, addresses: the asyncio gateway; devices: local devices via pyusb;
  cli: the ``usbgate`` command.
"""
