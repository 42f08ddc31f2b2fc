"""A USB mass-storage device's firmware, sans-IO: SCSI commands and the Bulk-Only Transport.

- scsi: ``ScsiDisk`` answers the SCSI commands Linux's sd and usb-storage send, against a
  ``BlockStore`` (``FileStore``: an image file; ``MemoryStore``: tests);
- bot: ``BulkOnlyTransport`` turns bulk transfers (CBW, data, CSW) into those commands.

usbgate.simulator puts them behind USB descriptors and usbredir (``MassStorageStick``).
"""

from usbgate.storage.bot import BulkOnlyTransport, Transfer
from usbgate.storage.scsi import FileStore, Identity, MemoryStore, ScsiDisk

__all__ = ["BulkOnlyTransport", "FileStore", "Identity", "MemoryStore", "ScsiDisk", "Transfer"]
