"""The product's one error hierarchy, and the exit statuses the CLIs report.

Every error vmshield reports to a user derives from `VmshieldError` (the keystore's
`KeystoreError` and usbgate's `UsbgateError` too). Each message says what happened and what
to do. `exit_code` is the status a command exits with when the error reaches its CLI, so a
script can tell "try again" (75) from "not allowed" (77) without parsing messages.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Exit statuses of `vmshield` and `usbgate` (sysexits.h where one fits)."""

    OK = 0
    #: any error not listed below
    ERROR = 1
    #: bad command line (click's own status)
    USAGE = 2
    #: EX_IOERR: an erase's verification read back something else than it wrote
    IOERR = 74
    #: EX_TEMPFAIL: busy (locked keystore, image in use); nothing was done, try again
    TEMPFAIL = 75
    #: EX_NOPERM: authentication failed, account locked, or a policy forbids it
    NOPERM = 77
    #: interrupted by Ctrl-C (as a shell reports SIGINT); run the command again to resume
    INTERRUPTED = 130


class VmshieldError(Exception):
    """Base of every error vmshield reports to a user."""

    exit_code: int = ExitStatus.ERROR


class ImageError(VmshieldError):
    """The image cannot be used: missing, truncated, corrupt or not a supported container."""


class UnsupportedError(ImageError):
    """The container is valid but uses a cipher, hash or feature vmshield does not implement."""


class InvalidPassphrase(VmshieldError):
    """No keyslot opens with this passphrase (wrong passphrase or damaged keyslot: no oracle)."""


class ImageBusy(VmshieldError):
    """Another process holds the image (a read-write server, or an erase in progress)."""

    exit_code = ExitStatus.TEMPFAIL


class Fenced(VmshieldError):
    """The server's cluster-wide lease is gone: it must not touch the image any more."""


class VerificationFailed(VmshieldError):
    """An erase's last pass did not read back as written; the image was kept."""

    exit_code = ExitStatus.IOERR

    def __init__(self, message: str, *, certificate: str | None = None,
                 sha256: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        #: the certificate that records the failure, for a caller that reports it
        self.certificate = certificate
        self.sha256 = sha256
