"""Every syscall helper the disk side needs, written once.

- ``io``: positioned reads and writes that finish (``pread_all``, ``preadinto_all``,
  ``pwrite_all``).
- ``extents``: holes and data (``data_segments``, ``first_hole``, ``punch_hole``), FIEMAP
  and the extents an overwrite must cover (``Extent``, ``allocated_extents``).
- ``blockdev``: block-device ioctls and sizes (``device_size``, ``logical_block_size``,
  ``blk_range_ioctl`` with ``BLKDISCARD``/``BLKSECDISCARD``/``BLKZEROOUT``,
  ``loop_device_of``, ``loop_backing_file``).
- ``locking``: one writer per image (``hold_image``, ``release_image``).
- ``files``: a file replaced whole, never through a planted link (``replace_file``).

OSError propagates as the kernel reported it; ``locking`` raises ``ImageBusy``.
"""

from nbd_plugin.osutil.blockdev import (
    BLKDISCARD,
    BLKSECDISCARD,
    BLKZEROOUT,
    blk_range_ioctl,
    device_size,
    is_block_device,
    logical_block_size,
    loop_backing_file,
    loop_device_of,
)
from nbd_plugin.osutil.extents import (
    Extent,
    allocated_extents,
    data_segments,
    fiemap,
    first_hole,
    punch_hole,
)
from nbd_plugin.osutil.io import pread_all, preadinto_all, pwrite_all
from nbd_plugin.osutil.locking import hold_image, release_image

__all__ = [
    "BLKDISCARD",
    "BLKSECDISCARD",
    "BLKZEROOUT",
    "Extent",
    "allocated_extents",
    "blk_range_ioctl",
    "data_segments",
    "device_size",
    "fiemap",
    "first_hole",
    "hold_image",
    "is_block_device",
    "logical_block_size",
    "loop_backing_file",
    "loop_device_of",
    "pread_all",
    "preadinto_all",
    "punch_hole",
    "pwrite_all",
    "release_image",
]
