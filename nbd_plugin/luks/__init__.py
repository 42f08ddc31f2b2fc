"""The LUKS format library: LUKS1 and LUKS2 images on files and block devices, named by path
(``open_volume``, ``create_image``, keyslot changes, ``info``; ``__all__`` below), with no
nbdkit and no click. Its modules and layers: docs/architecture.md.

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
