"""usbgate: a usbredir gateway that forwards only whitelisted USB devices to a VM.

Packages and modules, bottom up:

- usbredir/: the usbredir 0.7 protocol, sans-IO: wire (header, enums), control and data
  (one frozen dataclass per packet type), packets (the type registry), codec (the
  ``Connection``: receive_data/next_event/send), descriptors (USB descriptor parsing);
- policy: the one USBGuard-like rule model, its grammar and the decision; qemu_filter: QEMU
  ``filter=`` and libvirt ``<redirfilter>`` from the same rules;
- probe: reading a held device's descriptors and checking them against its announcement;
- session (one gateway connection's state machine), gateway, addresses: the asyncio gateway;
- sources, keystore_source: where rules come from and decisions go (keystore or a text file);
- devices: local devices via pyusb; simulator: a simulated USB owner; qmp: a small QMP client;
- storage/: a USB stick's firmware, sans-IO (SCSI commands, Bulk-Only Transport), which the
  simulator's ``MassStorageStick`` serves over usbredir from an image file;
- cli: the ``usbgate`` command (stick_cli: its ``simulate-stick``).
"""
