"""The LUKS format library: LUKS1 and LUKS2 images on files and block devices.

No nbdkit and no click here. Callers name an image by its path::

    from nbd_plugin.luks import create_image, open_volume

    create_image("disk.img", 1 << 30, passphrase, fmt="luks2")
    volume = open_volume("disk.img", passphrase, readonly=False)  # locked, unlocked
    volume.cipher.decrypt(buf, buf, volume.first_iv(sector))

Inside: ``images`` (the path-level operations below), ``formats`` (the typed format
registry: one module per format with the same functions), ``luks1/`` and ``luks2/`` (the
on-disk formats and their descriptor I/O), ``af`` (the anti-forensic splitter), ``regions``
(what a crypto-erase must destroy, with the damaged-header fallback) and ``volume``.

Errors: ``nbd_plugin.errors.ImageError`` (missing, truncated, corrupt: one line saying so),
``UnsupportedError`` (valid but not implemented here), ``InvalidPassphrase`` (no keyslot
opens: wrong passphrase or a damaged keyslot, indistinguishable), ``ImageBusy`` (locked).
"""

from nbd_plugin.luks.formats import FORMATS
from nbd_plugin.luks.images import (
    add_clevis_key,
    add_key,
    change_key,
    clevis_tokens,
    create_image,
    info,
    key_material_regions,
    kill_slot,
    open_volume,
    payload_region,
    probe,
    remove_key,
    set_clevis_jwe,
)
from nbd_plugin.luks.regions import luks_version, wipe_regions
from nbd_plugin.luks.volume import Volume

__all__ = [
    "FORMATS",
    "Volume",
    "add_clevis_key",
    "add_key",
    "change_key",
    "clevis_tokens",
    "create_image",
    "info",
    "key_material_regions",
    "kill_slot",
    "luks_version",
    "open_volume",
    "payload_region",
    "probe",
    "remove_key",
    "set_clevis_jwe",
    "wipe_regions",
]
