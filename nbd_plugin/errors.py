"""Exceptions of the disk side. Each message says what happened and what to do."""


class VmshieldError(Exception):
    """Base of every error vmshield reports to a user."""


class ImageError(VmshieldError):
    """The image cannot be used: missing, truncated, corrupt or not a supported container."""


class UnsupportedError(ImageError):
    """The container is valid but uses a cipher, hash or feature vmshield does not implement."""


class InvalidPassphrase(VmshieldError):
    """No keyslot opens with this passphrase (wrong passphrase or damaged keyslot: no oracle)."""


class ImageBusy(VmshieldError):
    """Another process holds the image (a read-write server, or an erase in progress)."""
