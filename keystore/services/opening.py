"""Which secret opens a disk when nobody types a password: the unattended order.

`vmshield disk serve --unattended` and the libvirt hook try, in this order:

1. ``unlock``: a pending `vmshield vm unlock` (the owner's password in root's keyring);
2. ``network``: a clevis token in the disk's LUKS2 header whose pins answer (a Tang server
   on this network, this host's TPM2, or an sss combination of them: `vmshield disk bind`);
3. ``host-key``: the host key of `vmshield disk enroll-host` (a root-only file).

The first that works opens the disk; its name is what the start records. A token that does
not answer (Tang down) falls through to the host key; if nothing is left, the error names
the pins that failed and says what still works (the owner's unlock).
"""

from __future__ import annotations

from dataclasses import dataclass

from keystore.errors import KeystoreError
from keystore.models import Disk
from keystore.services import clevis, unlock

WAYS = ("unlock", "network", "host-key")


class NoUnattendedKey(KeystoreError):
    """No way to open the disk without its owner; the message says what to do."""


@dataclass
class Opening:
    """The secret that opens a disk, the keyslot it is for (None: any) and which way."""

    how: str
    secret: bytearray
    keyslot: int | None = None
    pins: str = ""

    def wipe(self) -> None:
        self.secret[:] = bytes(len(self.secret))


def open_disk(
    disk: Disk, vm_name: str, owner_pw: bytearray | None, host_key: bytearray | None
) -> Opening:
    """The first way of WAYS that opens `disk`; NoUnattendedKey (or ClevisError) if none."""
    if owner_pw is not None:
        return Opening("unlock", bytearray(owner_pw))
    token_error: clevis.ClevisError | None = None
    try:
        got = clevis.unlock_with_token(disk.path)
    except clevis.ClevisError as e:
        got, token_error = None, e
    if got is not None:
        return Opening("network", got.passphrase, got.keyslot, got.pins)
    if host_key is not None and unlock.host_key_opens(disk.path, bytes(host_key)):
        return Opening("host-key", bytearray(host_key))
    if token_error is not None:
        raise NoUnattendedKey(
            f"disk {disk.name}: {token_error}: bring the server back, or start it with its "
            f"owner present: `vmshield vm unlock {vm_name}`"
        )
    raise NoUnattendedKey(
        f"unlock VM {vm_name} first: `vmshield vm unlock {vm_name}` "
        f"(or `vmshield disk enroll-host {disk.name}` for unattended starts)"
    )
