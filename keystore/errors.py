"""Exceptions of the keystore. Each message says what happened and what to do next."""

from __future__ import annotations


class KeystoreError(Exception):
    """Base of every error the keystore reports to a user."""


class DatabaseUnavailable(KeystoreError):
    """The database file is missing, unreadable, unwritable or not a vmshield keystore."""


class KeystoreBusy(KeystoreError):
    """Another process held the write lock longer than the busy timeout."""


class NotFound(KeystoreError):
    """The named VM, disk, user or rule does not exist."""


class AlreadyExists(KeystoreError):
    """A VM, disk or user with that name (or uuid, or path) is already recorded."""


class Conflict(KeystoreError):
    """The request contradicts the current state (e.g. removing a VM that still has disks)."""


class AuthenticationFailed(KeystoreError):
    """Unknown user or wrong password: one opaque error, no oracle."""


class AccountLocked(KeystoreError):
    """Too many failed attempts: refused without checking the password until the lock expires."""


class AuditChainBroken(KeystoreError):
    """The audit trail does not verify: a row was edited, inserted or deleted."""
