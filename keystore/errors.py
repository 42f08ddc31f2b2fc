"""Exceptions of the keystore. Each message says what happened and what to do next.

They derive from the product's one hierarchy (`nbd_plugin.errors.VmshieldError`) and carry
the exit status the `vmshield` command reports for them.
"""

from __future__ import annotations

from typing import TypeVar

from nbd_plugin.errors import ExitStatus, ImageBusy, InvalidPassphrase, VmshieldError


class KeystoreError(VmshieldError):
    """Base of every error the keystore reports to a user."""


class DatabaseUnavailable(KeystoreError):
    """The database file is missing, unreadable, unwritable or not a vmshield keystore."""


class KeystoreBusy(KeystoreError):
    """Another process held the write lock longer than the busy timeout."""

    exit_code = ExitStatus.TEMPFAIL


class NeedsLocalKeystore(KeystoreError):
    """The command works on a keystore file (jobs, images beside it), not a PostgreSQL URL."""

    exit_code = ExitStatus.USAGE


class NotFound(KeystoreError):
    """The named VM, disk, user or rule does not exist."""


class AlreadyExists(KeystoreError):
    """A VM, disk or user with that name (or uuid, or path) is already recorded."""


class Conflict(KeystoreError):
    """The request contradicts the current state (e.g. removing a VM that still has disks)."""


class InUse(KeystoreError):
    """The disk's image is held by a server or an erase: nothing was done, try again later."""

    exit_code = ExitStatus.TEMPFAIL


class PermissionDenied(KeystoreError):
    """A recorded policy (e.g. the VM's erase permissions) forbids what was asked."""

    exit_code = ExitStatus.NOPERM


class AuthenticationFailed(KeystoreError):
    """Unknown user or wrong password: one opaque error, no oracle."""

    exit_code = ExitStatus.NOPERM


class AccountLocked(KeystoreError):
    """Too many failed attempts: refused without checking the password until the lock expires."""

    exit_code = ExitStatus.NOPERM


class AuditChainBroken(KeystoreError):
    """The audit trail does not verify: a row was edited, inserted or deleted."""


E = TypeVar("E", bound=KeystoreError)


def image_error(cls: type[E], e: Exception, path: str, secret: str = "passphrase") -> E:
    """A disk-side failure changing image `path`'s keyslots as the keystore error `cls`,
    saying what to do (`secret`: what the caller gave, "password" or "passphrase")."""
    if isinstance(e, ImageBusy):
        return cls(f"{path} is in use (served read-write?): stop it first")
    if isinstance(e, InvalidPassphrase):
        return cls(f"no keyslot of {path} opens with that {secret}")
    return cls(f"{path}: {e}")
