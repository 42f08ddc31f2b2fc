"""A USB mass-storage device's firmware, sans-IO (SCSI commands, Bulk-Only Transport), which
usbgate.simulator serves over usbredir (docs/architecture.md).
"""

from usbgate.storage.bot import BulkOnlyTransport, Transfer
from usbgate.storage.scsi import FileStore, Identity, MemoryStore, ScsiDisk

__all__ = ["BulkOnlyTransport", "FileStore", "Identity", "MemoryStore", "ScsiDisk", "Transfer"]
