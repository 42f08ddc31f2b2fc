"""An honest look at what an overwrite can achieve on the storage under a target.

Overwriting a file only destroys the old bytes if the writes land on the same blocks of the
medium. Copy-on-write filesystems (btrfs, ZFS, bcachefs), log-structured ones (f2fs, nilfs2),
shared extents (reflinks, snapshots), thin provisioning and flash translation layers (SSDs) all
write elsewhere and may keep the old blocks. The assessment says which of these apply, as far
as this host can see, and which NIST SP 800-88 Rev. 2 category the erase supports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import stat
import struct
from typing import Any

FS_MAGIC = {
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x2FC12FC1: "zfs",
    0xCA451A4E: "bcachefs",
    0xF2F52010: "f2fs",
    0x3434: "nilfs2",
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x794C7630: "overlay",
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x00C36400: "ceph",
    0x65735546: "fuse",
    0x4D44: "vfat",
    0x2011BAB0: "exfat",
    0x5346544E: "ntfs",
}
COW_FS = {"btrfs", "zfs", "bcachefs"}
LOG_STRUCTURED_FS = {"f2fs", "nilfs2"}
REMOTE_FS = {"nfs", "cifs", "smb2", "ceph", "fuse", "overlay"}
MEMORY_FS = {"tmpfs", "ramfs"}
FS_IOC_GETFLAGS = 0x80086601
FS_NOCOW_FL = 0x00800000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def filesystem_type(path: str) -> str:
    """Name of the filesystem holding `path`, from statfs(2)'s f_type."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return "unknown"
    magic = struct.unpack_from("=Q", buf.raw, 0)[0] & 0xFFFFFFFF
    return FS_MAGIC.get(magic, f"0x{magic:x}")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _sys_block(dev: int) -> str | None:
    """The /sys/block directory of a device number (the disk, for a partition)."""
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    if not os.path.exists(base):
        return None
    real = os.path.realpath(base)
    if os.path.exists(os.path.join(real, "partition")):
        real = os.path.dirname(real)
    return real


def _nocow(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        flags = struct.unpack("=i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
        return bool(flags & FS_NOCOW_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def describe_device(dev: int, notes: list[str], depth: int = 0) -> dict[str, Any]:
    """Name, rotational flag, thin provisioning and discard support of a block device."""
    sysdir = _sys_block(dev)
    info: dict[str, Any] = {"device": None, "rotational": None, "thin": False, "discard": None}
    if sysdir is None:
        notes.append("no block device under this filesystem (virtual or network filesystem)")
        return info
    name = os.path.basename(sysdir)
    info["device"] = name
    rot = _read(f"{sysdir}/queue/rotational")
    info["rotational"] = None if rot is None else rot == "1"
    dmax = _read(f"{sysdir}/queue/discard_max_bytes")
    info["discard"] = None if dmax is None else int(dmax) > 0
    if "/virtio" in sysdir or name.startswith(("vd", "xvd")):
        info["virtual"] = True
        notes.append(
            f"{name} is a virtual disk: the host's storage decides what an overwrite reaches"
        )
    backing = _read(f"{sysdir}/loop/backing_file")
    if backing:
        info["thin"] = True
        info["loop_backing_file"] = backing
        notes.append(f"{name} is a loop device over {backing}: writes go through a file")
        if depth < 2 and os.path.exists(backing):
            inner = assess_path(backing, depth + 1)
            info["backing"] = inner
            notes.extend(f"backing file: {n}" for n in inner["notes"])
    if os.path.isdir(f"{sysdir}/dm"):
        slaves = os.listdir(f"{sysdir}/slaves") if os.path.isdir(f"{sysdir}/slaves") else []
        names = [_read(f"{sysdir}/slaves/{s}/dm/name") or s for s in slaves]
        if any(n.endswith(("-tpool", "_tdata")) for n in names):
            info["thin"] = True
            notes.append(f"{name} is a device-mapper thin volume: overwrites may be remapped")
    if name.startswith("zram"):
        notes.append(f"{name} is compressed RAM: its contents vanish at power-off")
    return info


def assess_path(path: str, depth: int = 0, shared_extents: bool = False) -> dict[str, Any]:
    """The storage assessment of a file or block device (see the module docstring)."""
    notes: list[str] = []
    st = os.stat(path)
    block = stat.S_ISBLK(st.st_mode)
    result: dict[str, Any] = {"kind": "block device" if block else "file"}
    if block:
        result["filesystem"] = None
        result.update(describe_device(st.st_rdev, notes, depth))
        cow = False
    else:
        fs = filesystem_type(path)
        result["filesystem"] = fs
        cow = fs in COW_FS and not (fs == "btrfs" and _nocow(path))
        if fs in LOG_STRUCTURED_FS:
            cow = True
            notes.append(f"{fs} is log-structured: overwrites are written to new blocks")
        elif cow:
            notes.append(f"{fs} is copy-on-write: overwrites are written to new blocks")
        if shared_extents:
            notes.append("extents are shared with another file (reflink or snapshot)")
        if fs in REMOTE_FS:
            notes.append(
                f"{fs}: the blocks live elsewhere; this host cannot see how they are reused"
            )
        if fs in MEMORY_FS:
            notes.append(f"{fs} lives in memory: copies may have been swapped out")
        sparse = st.st_blocks * 512 < st.st_size
        result["sparse_file"] = sparse
        result.update(describe_device(st.st_dev, notes, depth))
        result["thin"] = bool(result["thin"] or sparse)
    result["copy_on_write"] = cow
    result["shared_extents"] = shared_extents
    result["overwrite_in_place"] = _in_place(result, notes)
    result["notes"] = notes
    return result


def _in_place(info: dict[str, Any], notes: list[str]) -> bool | None:
    """True when overwrites reach the same blocks, False when they do not, None if unknowable."""
    if info["copy_on_write"] or info["shared_extents"]:
        return False
    if info.get("rotational") is False:
        notes.append("non-rotational (flash) storage remaps writes: old blocks may remain")
        return False
    backing = info.get("backing")
    if backing is not None and backing["overwrite_in_place"] is not True:
        return backing["overwrite_in_place"]  # type: ignore[no-any-return]
    fs = info.get("filesystem") or ""
    if fs in REMOTE_FS or fs.startswith("0x"):
        return None
    if info["kind"] == "block device" and info.get("thin") and backing is None:
        return None
    return True


def nist_category(
    assessment: dict[str, Any], crypto_erased: bool, overwritten: bool
) -> dict[str, Any]:
    """The NIST SP 800-88 Rev. 2 category this erase supports, with its reasons and caveats."""
    in_place = assessment["overwrite_in_place"]
    techniques: list[str] = []
    caveats: list[str] = []
    if crypto_erased:
        techniques.append("cryptographic erase (all LUKS key material overwritten)")
    if overwritten:
        if in_place:
            techniques.append("overwrite of every allocated block in place (Clear)")
        else:
            techniques.append("overwrite through the filesystem, not assured to reach old blocks")
    if assessment.get("shared_extents"):
        # a reflinked copy or a snapshot keeps the header and keyslots this erase wiped
        category = "not assured"
        caveats.append(
            "extents were shared with another file (reflink or snapshot): that file keeps "
            "the LUKS header and keyslots and opens with the passphrase; erase it too"
        )
    elif crypto_erased:
        category = "Purge"
        if in_place is not True:
            caveats.append(
                "the storage may keep earlier copies of the LUKS header; each stays protected by "
                "the passphrases its keyslots had"
            )
        caveats.append("any header backup (cryptsetup luksHeaderBackup) must be destroyed too")
    elif overwritten and in_place:
        category = "Clear"
    else:
        category = "not assured"
    return {"category": category, "techniques": techniques, "caveats": caveats}
