"""Other signatures on a LUKS2 image, probed with libblkid as cryptsetup probes them.

cryptsetup recovers a LUKS2 header from its other copy only when libblkid finds no other
signature on the device (``detect_device_signatures`` in luks2_disk_metadata.c): an image
whose primary header was overwritten by, say, an LVM physical volume label belongs to that
other owner now, and serving or rewriting its LUKS2 header would destroy theirs. The probe is
cryptsetup's "fast detection": superblock types and partition tables, LUKS itself filtered
out, on the descriptor already open (no second open of the path).

libblkid (Debian's libblkid1, a required package) is loaded with ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

from nbd_plugin.errors import ImageError

_SUBLKS_TYPE = 1 << 5  # BLKID_SUBLKS_TYPE: define the TYPE value only
_FLTR_NOTIN = 1  # BLKID_FLTR_NOTIN: probe every type except the listed ones
# blkid_do_safeprobe's results
_FOUND, _NOTHING, _AMBIGUOUS = 0, 1, -2


@functools.cache
def _libblkid() -> Any:
    name = ctypes.util.find_library("blkid") or "libblkid.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.blkid_new_probe.restype = ctypes.c_void_p
    lib.blkid_new_probe.argtypes = []
    lib.blkid_free_probe.argtypes = [ctypes.c_void_p]
    lib.blkid_probe_set_device.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
    ]
    for fn in (
        lib.blkid_probe_enable_partitions,
        lib.blkid_probe_set_partitions_flags,
        lib.blkid_probe_enable_superblocks,
        lib.blkid_probe_set_superblocks_flags,
    ):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.blkid_probe_filter_superblocks_type.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_char_p),
    ]
    lib.blkid_do_safeprobe.argtypes = [ctypes.c_void_p]
    lib.blkid_probe_lookup_value.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    return lib


def _value(lib: Any, probe: int, name: bytes) -> str | None:
    data = ctypes.c_char_p()
    if lib.blkid_probe_lookup_value(probe, name, ctypes.byref(data), None) or not data.value:
        return None
    return data.value.decode("ascii", "replace")


def foreign_signature(fd: int) -> str | None:
    """What else libblkid finds on the image open on ``fd`` ("LVM2_member", "ambiguous"...),
    or None when it finds nothing but LUKS. ImageError when it cannot probe at all."""
    lib = _libblkid()
    if lib is None:
        raise ImageError("libblkid is missing: cannot check the image for other signatures")
    probe = lib.blkid_new_probe()
    if not probe:
        raise ImageError("libblkid could not start a probe")
    try:
        if lib.blkid_probe_set_device(probe, fd, 0, 0):
            raise ImageError("libblkid could not probe the image")
        lib.blkid_probe_enable_partitions(probe, 1)
        lib.blkid_probe_set_partitions_flags(probe, 0)
        lib.blkid_probe_enable_superblocks(probe, 1)
        lib.blkid_probe_set_superblocks_flags(probe, _SUBLKS_TYPE)
        names = (ctypes.c_char_p * 2)(b"crypto_LUKS", None)
        lib.blkid_probe_filter_superblocks_type(probe, _FLTR_NOTIN, names)
        result = lib.blkid_do_safeprobe(probe)
        if result == _NOTHING:
            return None
        if result == _FOUND:
            found = _value(lib, probe, b"TYPE") or _value(lib, probe, b"PTTYPE")
            return found or "an unnamed signature"
        return "ambiguous signatures" if result == _AMBIGUOUS else "a failed probe"
    finally:
        lib.blkid_free_probe(probe)
