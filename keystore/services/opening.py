"""Which secret opens a disk when nobody types a password: the unattended order.

`vmshield disk serve --unattended` and the libvirt hook try, in this order:

1. ``unlock``: a pending `vmshield vm unlock` (the owner's password in root's keyring);
2. ``network``: a clevis token in the disk's LUKS2 header whose pins answer (a Tang server
   on this network, this host's TPM2, or an sss combination of them: `vmshield disk bind`);
3. ``host-key``: the host key of `vmshield disk enroll-host` (a root-only file).

The first that works opens the disk; its name is what the start records. A token that does
not answer (Tang down) falls through to the host key; if nothing is left, the error names
the pins that failed and says what still works (the owner's unlock). The VM's unlock policy
(`vmshield vm set VM --unlock`) says which of 2 and 3 may be tried at all: an admin can
require network binding and forbid host keys; the owner's unlock is always allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from keystore.errors import KeystoreError
from keystore.models import Disk, Vm
from keystore.services import clevis, unlock
from nbd_plugin.errors import ExitStatus

WAYS = ("unlock", "network", "host-key")
#: the unattended ways each policy allows (besides the owner's unlock)
ALLOWED = {"owner": (), "network": ("network",), "host-key": ("host-key",),
           "any": ("network", "host-key")}  # fmt: skip


class NoUnattendedKey(KeystoreError):
    """No way to open the disk without its owner; the message says what to do."""


class PolicyForbids(NoUnattendedKey):
    """The VM's unlock policy forbids every way that could have opened the disk."""

    exit_code = ExitStatus.NOPERM


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
    disk: Disk, vm: Vm, owner_pw: bytearray | None, host_key: bytearray | None
) -> Opening:
    """The first way of WAYS the VM's policy allows that opens `disk`; NoUnattendedKey if
    none (naming the pins that did not answer)."""
    vm_name = vm.name
    if owner_pw is not None:
        return Opening("unlock", bytearray(owner_pw))
    allowed = ALLOWED.get(vm.unlock, ())
    token_error: clevis.ClevisError | None = None
    got = None
    if "network" in allowed:
        try:
            got = clevis.unlock_with_token(disk.path)
        except clevis.ClevisError as e:
            token_error = e
    if got is not None:
        return Opening("network", got.passphrase, got.keyslot, got.pins)
    if (
        "host-key" in allowed
        and host_key is not None
        and unlock.host_key_opens(disk.path, bytes(host_key))
    ):
        return Opening("host-key", bytearray(host_key))
    if vm.unlock != "any":
        way = {"owner": "only its owner's `vmshield vm unlock`",
               "network": "a bound clevis token (`vmshield disk bind`) or its owner's unlock",
               "host-key": "the enrolled host key or its owner's unlock"}[vm.unlock]  # fmt: skip
        why = f": {token_error}" if token_error is not None else ""
        raise PolicyForbids(
            f"disk {disk.name}: VM {vm_name}'s unlock policy is {vm.unlock}, so {way} may "
            f"open it{why}: `vmshield vm unlock {vm_name}`"
        )
    if token_error is not None:
        raise NoUnattendedKey(
            f"disk {disk.name}: {token_error}: bring the server back, or start it with its "
            f"owner present: `vmshield vm unlock {vm_name}`"
        )
    raise NoUnattendedKey(
        f"unlock VM {vm_name} first: `vmshield vm unlock {vm_name}` "
        f"(or `vmshield disk enroll-host {disk.name}` for unattended starts)"
    )
