"""Every syscall helper the disk side needs, written once (the names in ``__all__`` below; the
modules: docs/architecture.md). OSError propagates as the kernel reported it; ``locking``
raises ``ImageBusy``.
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
