"""One read-write server per image, whatever path it is reached by.

The image's flock (osutil/locking.py) is per inode, so it does not see a second server that
opens the same bytes through another inode: a loop device over the image file, or the file
behind a loop device. A read-write server therefore also

- refuses a regular file that backs a loop device (a server, a filesystem or a cryptsetup
  mapping on /dev/loopN writes the same bytes);
- opens a block device a second time with O_EXCL and keeps that descriptor: the kernel then
  refuses mounts, device-mapper tables, md arrays and other O_EXCL openers while it serves;
- for a loop device, takes the image lock of its backing file too, so a server of that file
  (which takes the same lock) cannot start, and does not start if one already runs.
"""

from __future__ import annotations

import errno
import os
import stat

from nbd_plugin.errors import ImageBusy
from nbd_plugin.osutil.blockdev import loop_backing_file, loop_device_of
from nbd_plugin.osutil.locking import hold_image


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def claim(fd: int, path: str, *, readonly: bool) -> list[int]:
    """Claim the image open on `fd` against writers through other inodes.

    Returns descriptors to keep open while serving (close them to release the claim); raises
    ImageBusy with the way out when another path to the same bytes is in use.
    """
    if readonly:
        return []
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        loop = loop_device_of(_fd_path(fd))
        if loop is not None:
            raise ImageBusy(
                f"{path} is attached to {loop}: a read-write server would share its bytes with "
                f"whatever uses {loop}; detach it (losetup -d {loop}) or serve read-only (-r)"
            )
        return []
    if not stat.S_ISBLK(st.st_mode):
        return []
    held: list[int] = []
    try:
        try:
            held.append(os.open(_fd_path(fd), os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            raise ImageBusy(
                f"{path} is in use: mounted, mapped (device-mapper, md, swap) or opened "
                "exclusively by another program; release it before serving it read-write"
            ) from None
        backing = loop_backing_file(st.st_rdev)
        if backing is not None:
            try:
                bfd = os.open(backing, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                bfd = -1  # "(deleted)" or in another mount namespace: nothing to lock by
            if bfd >= 0:
                held.append(bfd)
                try:
                    hold_image(bfd, backing, exclusive=True)
                except ImageBusy:
                    raise ImageBusy(
                        f"{path} is a loop device over {backing}, which another server or an "
                        "erase holds; stop that first (one read-write server per image)"
                    ) from None
        return held
    except BaseException:
        for h in held:
            os.close(h)
        raise
