"""usbgate: a usbredir gateway that forwards only whitelisted USB devices to a VM.

Packages and modules, bottom up:

- usbredir/: the usbredir 0.7 protocol, sans-IO: wire (header, enums), structs (what packet
  classes share), control, streams and data (one frozen dataclass per packet type), packets
  (the type registry), codec (the ``Connection``: receive_data/next_event/send), descriptors
  (USB descriptor parsing);
- rules/: the leaf the keystore imports too: policy (the one USBGuard-like rule model, its
  grammar, the decision and shadowing; the keystore stores these rules), qemu_filter (QEMU
  ``filter=`` and libvirt ``<redirfilter>`` from the same rules, for both qemu-filter
  commands), errors (the rule syntax error and usbgate's base error);
- probe: reading a held device's descriptors and checking them against its announcement;
- state (a session's transition table), replies (what a control reply to QEMU must be),
  relay (one gateway connection, sans-IO), session (its asyncio I/O), gateway, addresses:
  the gateway; auditing: the bounded audit queue and per-peer refusal rows;
- sources/: where rules come from and decisions go (a text file, memory); its keystore
  (SQLite) and postgres adapters are the only usbgate modules that import the keystore;
- devices: local devices via pyusb; simulator: a simulated USB owner;
- storage/: a USB stick's firmware, sans-IO (SCSI commands, Bulk-Only Transport), which the
  simulator's ``MassStorageStick`` serves over usbredir from an image file;
- cli: the ``usbgate`` command (stick_cli: its ``simulate-stick``).
"""
